"""The quiet console: known library notices become one line of ours, once, on rank 0; known noise is hidden;
unknown warnings still show; a short torchrun of the tiny default prints no raw library warning line."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
RAW = re.compile(r"Warning:|warnings\.warn\(|^[WE]\d{4} \d\d:\d\d:\d\d|MCore's|DeprecationWarning", re.M)
"""What a raw library warning or torch log line looks like."""

EMIT = r"""
import importlib.util, logging, warnings
# by path: this tests the module, not the import order of the megatron_rcm.training package
spec = importlib.util.spec_from_file_location("console", "megatron_rcm/training/console.py")
console = importlib.util.module_from_spec(spec)
spec.loader.exec_module(console)
console.quiet()
for where in ("optimizer", "clip_grads", "mixed_precision"):
    warnings.warn("Transformer Engine and Apex are not installed. Falling back to " + where, UserWarning)
warnings.warn("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is ...")
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning("MCore's async save is deprecated")
warnings.warn("something nobody has seen before", UserWarning)
print("done")
"""


def _env(**kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **kw)
    for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.parametrize("rank", ["0", "1"])
def test_known_notices_once_as_our_line_on_rank_zero(rank):
    p = subprocess.run([sys.executable, "-c", EMIT], cwd=REPO, env=_env(RANK=rank), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    err = p.stderr
    ours = [line for line in err.splitlines() if line.startswith("note: ")]
    if rank == "0":
        assert ours == ["note: Transformer Engine / Apex not installed: torch optimizers, megatron's local fused-op "
                        "fallbacks and SDPA attention in use", "note: no CUDA runtime found: running on CPU (gloo)"]
    else:
        assert ours == []
    for text in ("Transformer Engine and Apex", "torch.distributed is disabled", "No CUDA runtime", "MCore's"):
        assert text not in err
    assert "UserWarning: something nobody has seen before" in err  # unknown warnings are not ours to hide


@pytest.mark.distributed
def test_short_torchrun_prints_no_raw_library_warning(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "examples", "pretrain_rcm.py"), "training.train_iters=2", "training.global_batch_size=4",
           "training.micro_batch_size=2", "logging.eval_interval=0", "logging.tensorboard=false",
           f"run_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "iteration        2/       2" in out and "saved checkpoint" in out
    assert out.count("note: Transformer Engine / Apex not installed") == 1  # once, rank 0 only
    assert not RAW.search(out), RAW.search(out) and out[max(0, RAW.search(out).start() - 300):][:800]
