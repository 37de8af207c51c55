"""Pipeline parallelism in the rCM loop, end to end on CPU (torchrun, gloo, the shipped tiny teacher, float64):

- the shortened tiny default at PP=2 (x DP=1, two micro-batches per iteration, driven by the gloo pipeline
  schedule: no-grad rounds pipelined across micro-batches, the with-grad pass 1F1B) gives the DP=2 run's losses
  and grad norms for 10 iterations (same draws: the micro-batch slots are the same), within 1e-5 relative; so do
  PP=2 x TP=2 and PP=2 x CP=2 (ring) on 4 processes;
- its checkpoint resumes at PP=1 and a PP=1 checkpoint resumes at PP=2 (explicit uneven split), each continuing the
  reference trajectory;
- the EMA exported at PP=2, the same EMA exported at PP=1 and the PP=2 training checkpoint convert to bit-identical
  diffusers weights with tools/convert_checkpoint.py;
- per-pass times (`time/*`) in every iteration record;
- bad splits and too few micro-batches are refused before any work, with the field to change.
"""

import os
import shutil
import sys

import pytest

from megatron_rcm.training import checkpointing
from megatron_rcm.training.logger import read_metrics

sys.path.insert(0, os.path.dirname(__file__))
from test_checkpointing import F64, ITERS, _assert_close, _copy_checkpoints, _single  # noqa: E402
from test_trainer import REPO, _losses, _run, _torchrun  # noqa: E402

pytestmark = pytest.mark.distributed

PP2 = ["parallel.pipeline_model_parallel_size=2"]
REL = 1e-5


def _train(run_dir, extra=(), nproc=2):
    p = _run(_torchrun(nproc, [*F64, f"run_dir={run_dir}", *extra]))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """PP=1 x DP=2: checkpoints at 4, 8 and 10, the EMA exported at the end."""
    run_dir = str(tmp_path_factory.mktemp("pp_ref") / "run")
    _train(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """PP=2 x DP=1 (balanced split [2, 1]) from scratch, the same schedule."""
    run_dir = str(tmp_path_factory.mktemp("pp2") / "run")
    p = _train(run_dir, PP2)
    return run_dir, p.stdout


def test_pp2_gives_the_reference_losses_and_grad_norms(reference, pipeline_run):
    run, log = pipeline_run
    assert "TP 1 x CP 1 x PP 2 x DP 1" in log and "micro 8 x 2 x DP 1" in log
    meta = checkpointing.verify(os.path.join(checkpointing.checkpoints_dir(run), "iter_0000008"))
    assert meta["parallel"]["pipeline_model_parallel_size"] == 2
    a, b = _losses(read_metrics(run)), _losses(read_metrics(reference))
    assert {"loss/scm", "loss/dmd", "grad_norm/student"} <= set(a[5]) and "grad_norm/critic" in a[4]
    _assert_close(a, b, range(1, ITERS + 1), REL)


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2"],
                                    ["parallel.context_parallel_size=2", "parallel.cp_comm=ring"]],
                         ids=["pp2_tp2", "pp2_cp2_ring"])
def test_pipeline_composes_with_tensor_and_context_parallelism(reference, tmp_path, layout):
    """PP=2 x TP=2 and PP=2 x CP=2 (4 processes, DP=1) from scratch give the reference trajectory."""
    run = str(tmp_path / "run")
    p = _train(run, [*PP2, *layout, "checkpoint.save_interval=0", "checkpoint.save_at_end=false"], nproc=4)
    assert "PP 2 x DP 1" in p.stdout
    _assert_close(_losses(read_metrics(run)), _losses(read_metrics(reference)), range(1, ITERS + 1), REL)


def test_schedule_named_at_pp1_gives_the_unscheduled_trajectory(reference, tmp_path):
    """`parallel.pp_schedule=gloo` without pipeline parallelism runs the same passes through the schedule."""
    run = str(tmp_path / "run")
    _train(run, ["parallel.pp_schedule=gloo", "checkpoint.save_interval=0", "checkpoint.save_at_end=false"])
    _assert_close(_losses(read_metrics(run)), _losses(read_metrics(reference)), range(1, ITERS + 1), REL)


def test_iteration_records_hold_per_pass_times(pipeline_run):
    run, _ = pipeline_run
    m = read_metrics(run)
    student, critic = m[5], m[4]  # a student iteration with DMD on, a critic iteration
    for k in ("time/teacher_cfg", "time/student_jvp", "time/rollout", "time/dmd_gradient", "time/student_grad",
              "time/optimizer"):
        assert student[k] > 0, k
    for k in ("time/rollout", "time/critic_grad", "time/optimizer"):
        assert critic[k] > 0, k
    assert "time/critic_grad" not in student and "time/student_grad" not in critic


def test_resume_pp2_to_pp1(reference, pipeline_run, tmp_path):
    run = str(tmp_path / "run")
    _copy_checkpoints(pipeline_run[0], run, names=("iter_0000004",), latest="iter_0000004")
    p = _train(run, nproc=1)
    assert "at iteration 4" in p.stdout
    resumed = _losses(read_metrics(run))
    assert sorted(resumed) == list(range(5, ITERS + 1))
    _assert_close(resumed, _losses(read_metrics(reference)), range(5, ITERS + 1), REL)


def test_resume_pp1_to_pp2_explicit_split(reference, tmp_path):
    run = str(tmp_path / "run")
    _copy_checkpoints(reference, run, names=("iter_0000004",), latest="iter_0000004")
    p = _train(run, [*PP2, "parallel.pipeline_layers=[1,2]"])
    assert "at iteration 4" in p.stdout
    resumed = _losses(read_metrics(run))
    assert sorted(resumed) == list(range(5, ITERS + 1))
    _assert_close(resumed, _losses(read_metrics(reference)), range(5, ITERS + 1), REL)


def _diffusers(tmp, name, *args):
    out = os.path.join(tmp, name)
    p = _run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "mcore-to-hf", "--model", "wan",
              "--transformer-only", *args, "--output", out], timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    from megatron_rcm.checkpoint import hf

    return hf.read_state_dict(out)


def test_pp2_checkpoints_convert_to_the_pp1_diffusers_weights_bitwise(pipeline_run, tmp_path):
    import torch

    run, _ = pipeline_run
    # the same weights exported at PP=1: the PP=2 run's last checkpoint, relaunched on one process without its
    # export, writes the EMA export the run lacks
    again = str(tmp_path / "again")
    _copy_checkpoints(run, again, names=(f"iter_{ITERS:07d}",), latest=f"iter_{ITERS:07d}")
    p = _train(again, nproc=1)
    assert "had no complete EMA export: exported the EMA" in p.stdout, p.stdout[-2000:]
    pp2 = _diffusers(str(tmp_path), "pp2_ema", "--input", os.path.join(run, "ema"))
    pp1 = _diffusers(str(tmp_path), "pp1_ema", "--input", os.path.join(again, "ema"))
    ckpt = _diffusers(str(tmp_path), "pp2_training", "--input", run)  # the training checkpoint's EMA
    assert set(pp2) == set(pp1) == set(ckpt) and any(k.startswith("blocks.2.") for k in pp2)
    for k, v in pp2.items():
        assert v.dtype == torch.float64 and torch.equal(v, pp1[k]) and torch.equal(v, ckpt[k]), k
    shutil.rmtree(again)


@pytest.mark.parametrize("overrides, message", [
    ([*PP2, "parallel.pipeline_layers=[2,2]"],
     "parallel.pipeline_layers [2, 2] must give each of the 2 pipeline stages"),
    ([*PP2, "parallel.pipeline_layers=[3]"], "parallel.pipeline_layers [3] must give each of the 2"),
    (["parallel.pipeline_model_parallel_size=4"], "parallel.pipeline_model_parallel_size=4 exceeds the 3 blocks"),
    ([*PP2, "training.global_batch_size=8"], "gives 1 < parallel.pipeline_model_parallel_size=2"),
])
def test_bad_pipeline_layouts_are_refused_before_any_work(tmp_path, overrides, message):
    run = str(tmp_path / "run")
    world = "4" if "parallel.pipeline_model_parallel_size=4" in overrides else "2"
    p = _single(run, overrides, env={"WORLD_SIZE": world})
    assert p.returncode != 0
    assert message in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(run)
