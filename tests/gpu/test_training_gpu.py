"""The training loop on GPUs: megatron-core DDP + distributed optimizer (the `megatron` grad-sync path).

- one GPU: the megatron path gives the losses of the plain-torch path (`parallel.grad_sync=torch`, what the CPU runs)
  on the same device and random stream, within floating-point tolerance;
- two GPUs data-parallel = one GPU with 2x gradient accumulation;
- a checkpoint written on two GPUs (distributed optimizer state gathered DP-size independent) resumes on one and
  continues the one-GPU trajectory; the EMA is exported through dist_checkpointing.

Run: pytest -m gpu tests/gpu/test_training_gpu.py (needs 2 GPUs for the last two tests).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHORT = ["rcm.tangent_warmup=3", "logging.log_interval=1", "logging.eval_interval=0", "checkpoint.save_interval=0",
         "training.threads=0"]
# TF32 convolutions / matmuls would make the comparison a 1e-3 one
ENV = {"NVIDIA_TF32_OVERRIDE": "0"}


def _train(run_dir, nproc, extra=()):
    env = dict(os.environ, **ENV)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(REPO, "examples", "pretrain_rcm.py"), *SHORT, f"run_dir={run_dir}", *extra]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout


def _metrics(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["iteration"]] = r
    return out


def _assert_same_losses(a, b, iterations, rel):
    for i in iterations:
        keys = [k for k in a[i] if k.startswith("loss/")]
        assert keys and a[i]["phase"] == b[i]["phase"]
        for k in keys:
            assert b[i][k] == pytest.approx(a[i][k], rel=rel, abs=1e-6), (i, k, a[i][k], b[i][k])


def _need(n):
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs")


def test_megatron_ddp_and_distributed_optimizer_match_the_torch_path(tmp_path):
    _need(1)
    log = _train(str(tmp_path / "megatron"), 1, ["training.train_iters=6", "parallel.grad_sync=megatron"])
    assert "grad sync MegatronTrainable" in log
    assert os.path.isfile(tmp_path / "megatron" / "ema" / "megatron_rcm.json")  # dist_checkpointing export
    log = _train(str(tmp_path / "torch"), 1, ["training.train_iters=6", "parallel.grad_sync=torch"])
    assert "grad sync TorchTrainable" in log
    a, b = _metrics(tmp_path / "torch"), _metrics(tmp_path / "megatron")
    _assert_same_losses(a, b, range(1, 4), rel=1e-4)  # the first losses: fp32, only reduction order differs
    _assert_same_losses(a, b, range(4, 7), rel=1e-2)


def test_two_gpus_equal_one_gpu_with_gradient_accumulation(tmp_path):
    _need(2)
    _train(str(tmp_path / "one"), 1, ["training.train_iters=6", "parallel.grad_sync=megatron"])
    _train(str(tmp_path / "two"), 2, ["training.train_iters=6", "parallel.grad_sync=megatron"])
    _assert_same_losses(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"), range(1, 4), rel=1e-4)
    _assert_same_losses(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"), range(4, 7), rel=1e-2)


def test_save_on_two_gpus_resume_on_one(tmp_path):
    _need(2)
    run = str(tmp_path / "run")
    _train(run, 2, ["training.train_iters=8", "parallel.grad_sync=megatron", "checkpoint.save_interval=4",
                    "checkpoint.exit_after_iteration=5"])
    log = _train(run, 1, ["training.train_iters=8", "parallel.grad_sync=megatron", "checkpoint.save_interval=4"])
    assert "resumed from" in log and "at iteration 4" in log
    ref = str(tmp_path / "ref")
    _train(ref, 1, ["training.train_iters=8", "parallel.grad_sync=megatron"])
    _assert_same_losses(_metrics(ref), _metrics(run), range(5, 9), rel=1e-2)
