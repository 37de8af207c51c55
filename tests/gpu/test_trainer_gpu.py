"""The training loop on GPUs: megatron-core DDP + distributed optimizer (the `megatron` grad-sync path).

- one GPU: the megatron path gives the losses of the plain-torch path (`parallel.grad_sync=torch`, what the CPU runs)
  on the same device and random stream, within floating-point tolerance;
- one GPU against the CPU: the megatron path's first losses are those of the CPU/gloo/torch path (the loop draws
  from CPU generators, so a seed gives the same times and noise on both devices; fp32, TF32 off);
- two GPUs data-parallel = one GPU with 2x gradient accumulation;
- a checkpoint written on two GPUs (the distributed optimizer's state as ShardedTensors under the parameters'
  global names) resumes on one and continues the one-GPU trajectory, also across a TP change (TP=2 -> TP=1 and
  TP=1 -> TP=2); the EMA is exported through dist_checkpointing.

Run: pytest -m gpu tests/gpu/test_trainer_gpu.py (needs 2 GPUs for the last two tests).
"""

import os
import subprocess
import sys

import pytest
import torch

from megatron_rcm.training.logger import read_metrics

pytestmark = pytest.mark.gpu

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHORT = ["rcm.tangent_warmup=3", "logging.log_interval=1", "logging.eval_interval=0", "checkpoint.save_interval=0",
         "training.threads=0"]
# TF32 convolutions / matmuls would make the comparison a 1e-3 one. The loop sets no matmul precision: torch's
# defaults leave cuBLAS matmuls in fp32 but allow TF32 in cuDNN convolutions (the patch embedding); this variable
# turns TF32 off in both libraries.
ENV = {"NVIDIA_TF32_OVERRIDE": "0"}
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # the CPU path: no CUDA, so gloo and the torch grad sync (`auto`)


def _train(run_dir, nproc, extra=(), env_extra=None):
    env = dict(os.environ, **ENV, **(env_extra or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(REPO, "examples", "pretrain_rcm.py"), *SHORT, f"run_dir={run_dir}", *extra]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout


def _assert_same_losses(a, b, iterations, rel, prefixes=("loss/",)):
    for i in iterations:
        keys = [k for k in a[i] if k.startswith(prefixes)]
        assert keys and a[i]["phase"] == b[i]["phase"]
        for k in keys:
            assert b[i][k] == pytest.approx(a[i][k], rel=rel, abs=1e-6), (i, k, a[i][k], b[i][k])


def _need(n):
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs")


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory):
    """The tiny default for 6 iterations (sCM-only student steps, a critic step, a student step with the DMD
    regularizer and its rollout, a critic step) on one GPU: megatron-core DDP + distributed optimizer, a training
    checkpoint and the EMA exported through dist_checkpointing at the end. Shared by the comparisons below."""
    _need(1)
    run = tmp_path_factory.mktemp("megatron")
    log = _train(str(run), 1, ["training.train_iters=6", "parallel.grad_sync=megatron",
                               "parallel.use_distributed_optimizer=true"])
    assert "grad sync MegatronTrainable" in log
    assert os.path.isfile(run / "ema" / "megatron_rcm.json")  # dist_checkpointing export
    return read_metrics(run)


def test_megatron_ddp_and_distributed_optimizer_match_the_torch_path(tmp_path, megatron_run):
    log = _train(str(tmp_path / "torch"), 1, ["training.train_iters=6", "parallel.grad_sync=torch"])
    assert "grad sync TorchTrainable" in log
    a, b = read_metrics(tmp_path / "torch"), megatron_run
    _assert_same_losses(a, b, range(1, 4), rel=1e-4)  # the first losses: fp32, only reduction order differs
    _assert_same_losses(a, b, range(4, 7), rel=1e-2)


def test_megatron_path_on_gpu_matches_the_cpu_path(tmp_path, megatron_run):
    """The same seed on the CPU (CUDA hidden: gloo, torch grad sync, AdamW, CPU kernels) and on the GPU (megatron):
    the same data, times, noise and rollout lengths, so the losses differ only by floating-point rounding (fp32
    kernels of two devices, reduction order, a different Adam implementation)."""
    cpu_only = ["training.train_iters=6", "checkpoint.save_at_end=false"]
    log = _train(str(tmp_path / "cpu"), 1, cpu_only, env_extra=CPU_ONLY)
    assert "grad sync TorchTrainable" in log  # grad_sync=auto chose the torch path: the process saw no CUDA
    cpu = read_metrics(tmp_path / "cpu")
    # the sCM loss of the warm-up steps is ~||g||^2 of a normalised target (close to 1 whatever its direction): the
    # gradient norms are compared too, they depend on the target's direction
    checked = ("loss/", "grad_norm/")
    _assert_same_losses(cpu, megatron_run, range(1, 6), rel=1e-3, prefixes=checked)
    _assert_same_losses(cpu, megatron_run, range(6, 7), rel=1e-2, prefixes=checked)
    # the tolerance separates random streams: another seed's first iteration lies outside it
    _train(str(tmp_path / "other-seed"), 1, ["training.seed=1235", *cpu_only[1:], "training.train_iters=1"],
           env_extra=CPU_ONLY)
    other = read_metrics(tmp_path / "other-seed")[1]
    for k in ("loss/total", "grad_norm/student"):
        assert other[k] != pytest.approx(megatron_run[1][k], rel=1e-3), (k, other[k])


def test_pass_timers_by_cuda_events_match_synchronised_ones(tmp_path, megatron_run):
    """`logging.pass_timers=events` (the default, used by megatron_run) times every pass `sync` times, each a GPU
    time that fits in its iteration, and the losses do not depend on the timers."""
    _train(str(tmp_path / "sync"), 1, ["training.train_iters=6", "parallel.grad_sync=megatron",
                                       "parallel.use_distributed_optimizer=true", "logging.pass_timers=sync",
                                       "checkpoint.save_at_end=false"])
    synced = read_metrics(tmp_path / "sync")
    _assert_same_losses(megatron_run, synced, range(1, 4), rel=1e-4)  # as two runs of one path (above)
    _assert_same_losses(megatron_run, synced, range(4, 7), rel=1e-2)
    for i in range(2, 7):
        events = {k: v for k, v in megatron_run[i].items() if k.startswith("time/")}
        walls = {k: v for k, v in synced[i].items() if k.startswith("time/")}
        assert set(events) == set(walls) and events, (i, events, walls)
        assert all(v > 0 for v in events.values()), events


def test_two_gpus_equal_one_gpu_with_gradient_accumulation(tmp_path):
    _need(2)
    _train(str(tmp_path / "one"), 1, ["training.train_iters=6", "parallel.grad_sync=megatron"])
    _train(str(tmp_path / "two"), 2, ["training.train_iters=6", "parallel.grad_sync=megatron"])
    _assert_same_losses(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), range(1, 4), rel=1e-4)
    _assert_same_losses(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), range(4, 7), rel=1e-2)


def test_save_on_two_gpus_resume_on_one(tmp_path):
    _need(2)
    run = str(tmp_path / "run")
    _train(run, 2, ["training.train_iters=8", "parallel.grad_sync=megatron", "checkpoint.save_interval=4",
                    "checkpoint.exit_after_iteration=5"])
    log = _train(run, 1, ["training.train_iters=8", "parallel.grad_sync=megatron", "checkpoint.save_interval=4"])
    assert "resumed from" in log and "at iteration 4" in log
    ref = str(tmp_path / "ref")
    _train(ref, 1, ["training.train_iters=8", "parallel.grad_sync=megatron"])
    _assert_same_losses(read_metrics(ref), read_metrics(run), range(5, 9), rel=1e-2)


@pytest.mark.parametrize("save_layout, resume_layout", [((2, 2), (1, 1)), ((1, 1), (2, 2))],
                         ids=["tp2_to_tp1", "tp1_to_tp2"])
def test_resume_across_a_tensor_parallel_change(tmp_path, save_layout, resume_layout):
    """(nproc, TP) of the run that saves at iteration 4 and dies at 5, and of the run that resumes it."""
    _need(2)
    common = ["training.train_iters=8", "parallel.grad_sync=megatron", "checkpoint.save_interval=4"]
    run = str(tmp_path / "run")
    _train(run, save_layout[0], [*common, f"parallel.tensor_model_parallel_size={save_layout[1]}",
                                 "checkpoint.exit_after_iteration=5"])
    log = _train(run, resume_layout[0], [*common, f"parallel.tensor_model_parallel_size={resume_layout[1]}"])
    assert "resumed from" in log and "at iteration 4" in log
    ref = str(tmp_path / "ref")
    _train(ref, 1, ["training.train_iters=8", "parallel.grad_sync=megatron"])
    _assert_same_losses(read_metrics(ref), read_metrics(run), range(5, 9), rel=1e-2)
