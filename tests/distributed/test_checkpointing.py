"""Training checkpoints you can trust, end to end on CPU (torchrun, gloo, the shipped tiny teacher):

- layout-independent resume: saved at TP=2 -> resumed at TP=1, TP=1 -> TP=2, DP=2 -> DP=1, CP=2 -> CP=1, CP=1 -> CP=2
  (a2a and ring), each continuing the
  uninterrupted run's losses (float64 networks, so that the layouts' different summation orders stay far below
  the 1e-6 tolerance; float32 is compared bitwise at an unchanged layout in test_trainer.py);
- a damaged newest checkpoint (truncated shard) -> fallback to the previous one, the same trajectory bitwise; a
  kill during the final EMA export -> the relaunch writes `ema/`, equal to the uninterrupted run's;
- nothing lost: `latest` deleted -> refused, nothing deleted; a pickle payload in `.metadata` -> refused, never run;
- one job per run directory: a second launch fails at once naming the first; kill -9 of torchrun kills its workers;
- bad input and changed configs on resume: one line naming the field or file, `config.yaml` unchanged.
"""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_rcm.checkpoint import io
from megatron_rcm.training import checkpointing
from megatron_rcm.training.logger import METRICS_FILE, read_metrics

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import REPO, SHORT, _env, _losses, _run, _torchrun  # noqa: E402

pytestmark = pytest.mark.distributed

# 10 iterations: the first ten logged losses and grad norms of every layout are compared with the DP=2 run's
ITERS = 10
F64 = [*SHORT, "model.params_dtype=float64", "logging.eval_interval=0", f"training.train_iters={ITERS}",
       "checkpoint.keep_last=3"]


def _train(run_dir, extra=(), nproc=2, ok=True):
    p = _run(_torchrun(nproc, [*F64, f"run_dir={run_dir}", *extra]))
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _single(run_dir, extra=(), env=None):
    """One process without torchrun: what a refusal needs (it comes before any process group)."""
    return _run([sys.executable, os.path.join(REPO, "examples", "pretrain_rcm.py"), *F64, f"run_dir={run_dir}",
                 *extra], env={**_env(), **(env or {})}, timeout=180)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: TP=1 x DP=2, checkpoints at 4, 8 and 10, the EMA exported at the end."""
    run_dir = str(tmp_path_factory.mktemp("f64") / "run")
    _train(run_dir)
    return run_dir


def _copy_checkpoints(reference, run_dir, names=("iter_0000004", "iter_0000008"), latest="iter_0000008"):
    src, dst = checkpointing.checkpoints_dir(reference), checkpointing.checkpoints_dir(run_dir)
    os.makedirs(dst)
    for n in names:
        shutil.copytree(os.path.join(src, n), os.path.join(dst, n))
    if latest:
        with open(os.path.join(dst, "latest"), "w") as f:
            f.write(latest + "\n")
    shutil.copy(os.path.join(reference, "config.yaml"), os.path.join(run_dir, "config.yaml"))
    return dst


def _assert_close(a, b, iterations, rel):
    for i in iterations:
        assert a[i].keys() == b[i].keys(), i
        for k, v in a[i].items():
            if v != v:  # the injected NaN loss (iteration 6)
                assert b[i][k] != b[i][k], (i, k)
                continue
            assert v == pytest.approx(b[i][k], rel=rel, abs=1e-12), (i, k, v, b[i][k])


def test_save_at_tp2_resume_at_tp1(reference, tmp_path):
    run = str(tmp_path / "run")
    _train(run, ["parallel.tensor_model_parallel_size=2", "checkpoint.exit_after_iteration=6"])
    meta = checkpointing.verify(os.path.join(checkpointing.checkpoints_dir(run), "iter_0000004"))
    assert meta["parallel"]["tensor_model_parallel_size"] == 2
    p = _train(run)
    assert "resumed from" in p.stdout and "at iteration 4" in p.stdout
    _assert_close(_losses(read_metrics(run)), _losses(read_metrics(reference)), range(1, ITERS + 1), 1e-6)


@pytest.mark.parametrize("layout, nproc", [(["parallel.tensor_model_parallel_size=2"], 2), ([], 1)],
                         ids=["tp1_to_tp2", "dp2_to_dp1"])
def test_resume_at_another_layout(reference, tmp_path, layout, nproc):
    run = str(tmp_path / "run")
    _copy_checkpoints(reference, run, names=("iter_0000004",), latest="iter_0000004")
    p = _train(run, layout, nproc=nproc)
    assert "at iteration 4" in p.stdout
    resumed = _losses(read_metrics(run))
    assert sorted(resumed) == list(range(5, ITERS + 1))
    _assert_close(resumed, _losses(read_metrics(reference)), range(5, ITERS + 1), 1e-6)


def test_truncated_newest_falls_back_and_a_killed_export_is_rewritten(reference, tmp_path):
    run = str(tmp_path / "run")
    root = _copy_checkpoints(reference, run)
    shard = os.path.join(root, "iter_0000008", "tensors", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(100)
    p = _train(run, ["checkpoint.exit_during_export=true"], ok=False)
    assert p.returncode != 0  # died in the export
    assert f"{shard}: truncated (100 of" in p.stdout, p.stdout[-3000:]
    assert "resuming from the newest complete older checkpoint iter_0000004" in p.stdout
    assert _losses(read_metrics(run)) == {i: v for i, v in _losses(read_metrics(reference)).items() if i > 4}
    assert not os.path.exists(os.path.join(run, "ema"))
    assert [d for d in os.listdir(run) if d.startswith("ema.incomplete-")]
    p = _train(run)
    assert "had no complete EMA export: exported the EMA" in p.stdout, p.stdout[-3000:]
    assert not [d for d in os.listdir(run) if d.startswith("ema.")]
    ours, theirs = io.load_full(os.path.join(run, "ema")), io.load_full(os.path.join(reference, "ema"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert checkpointing.read_network(run)[2].keys() == ours.keys()


def test_missing_latest_refuses_and_deletes_nothing(reference, tmp_path):
    run = str(tmp_path / "run")
    root = _copy_checkpoints(reference, run, latest=None)
    p = _single(run, ["checkpoint.keep_last=1"])
    assert p.returncode != 0
    line = p.stderr.strip().splitlines()[-1]
    assert "checkpoints/latest is missing but complete checkpoints exist (iter_0000004, iter_0000008)" in line
    assert "training.resume_from=PATH" in line and "training.resume=false" in line
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000008"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_in_the_index_is_refused_and_never_runs(reference, tmp_path):
    run = str(tmp_path / "run")
    root = _copy_checkpoints(reference, run)
    meta, marker = os.path.join(root, "iter_0000008", "tensors", ".metadata"), str(tmp_path / "marker")
    with open(meta, "rb") as f:
        index = pickle.load(f)
    with open(meta, "wb") as f:
        pickle.dump((_Payload(marker), index), f)
    p = _single(run)
    assert p.returncode != 0
    assert f"error: {meta}: refusing to load _io.open" in p.stderr, p.stderr[-2000:]
    assert "resuming from" not in p.stdout  # an unsafe file is no damage to fall back from
    assert not os.path.exists(marker)


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_one_job_per_run_dir_and_no_worker_outlives_the_launcher(tmp_path):
    run = str(tmp_path / "run")
    cmd = _torchrun(2, [*F64, f"run_dir={run}", "training.train_iters=400", "checkpoint.save_interval=2",
                           "checkpoint.keep_last=0"])
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = os.path.join(run, METRICS_FILE)
        deadline = time.time() + 240
        while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
            time.sleep(0.2)
        root = checkpointing.checkpoints_dir(run)
        before = checkpointing.complete_checkpoints(root)
        assert before
        workers = _children(first.pid)
        assert len(workers) == 2
        t0 = time.time()
        second = _single(run)
        took = time.time() - t0
        assert second.returncode != 0
        line = second.stderr.strip().splitlines()[-1]
        assert f"{run} is in use by another job (host " in line and " pid " in line, line
        assert int(line.split(" pid ")[1].split(";")[0]) in workers  # the first job's rank 0
        # it stops before any model is built: what it costs is the imports (seconds on an idle machine; 75 s were
        # seen with the first job training and other test suites on the same 2 cores)
        assert "rCM:" not in second.stdout and took < 150
        assert set(before) <= set(checkpointing.complete_checkpoints(root))
        for name in before:
            checkpointing.verify(os.path.join(root, name))
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)]
    finally:
        if first.poll() is None:
            first.kill()


@pytest.mark.parametrize("overrides, message", [
    (["training.global_batch_size=0"], "training.global_batch_size must be >= 1, got 0"),
    (["logging.log_interval=0"], "logging.log_interval must be >= 1, got 0"),
    (["data.frames=0"], "data.frames must be >= 1, got 0"),
    (["optimizer.adam_beta2=1.0"], "optimizer.adam_beta2 must be in [0, 1), got 1.0"),
    (["--config", "{bad_yaml}"], "bad.yaml: YAML syntax error at line 3, column 1: expected ',' or ']'"),
    (["training.micro_batch_size=4"], "training.micro_batch_size: 8 -> 4"),
    (["model.params_dtype=float32"], "model.params_dtype: 'float64' -> 'float32'"),
    (["training.resume=false"], "training.resume=false but"),
])
def test_bad_input_leaves_the_run_dir_as_it_was(reference, tmp_path, overrides, message):
    run = str(tmp_path / "run")
    _copy_checkpoints(reference, run)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("training:\n  train_iters: [8\n")
    overrides = [o.format(bad_yaml=bad_yaml) for o in overrides]
    config = open(os.path.join(run, "config.yaml")).read()
    listing = sorted(os.listdir(run))
    p = _single(run, overrides)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], p.stderr[-2000:]
    assert open(os.path.join(run, "config.yaml")).read() == config
    assert sorted(d for d in os.listdir(run) if d != checkpointing.LOCK) == listing


def test_allow_config_change_is_logged(reference, tmp_path):
    run = str(tmp_path / "run")
    _copy_checkpoints(reference, run, names=("iter_0000004",), latest="iter_0000004")
    p = _train(run, ["training.micro_batch_size=4", "training.allow_config_change=true", "training.train_iters=5"])
    assert "allow_config_change: continuing" in p.stdout and "training.micro_batch_size: 8 -> 4" in p.stdout
    assert sorted(read_metrics(run)) == [5]


def test_context_parallel_run_then_resume_at_cp1(reference, tmp_path):
    """CP=2 (Ulysses) from scratch gives the DP=2 run's losses; its checkpoint resumes at CP=1 on one process."""
    run = str(tmp_path / "run")
    _train(run, ["parallel.context_parallel_size=2", "parallel.cp_comm=a2a", "checkpoint.exit_after_iteration=6"])
    meta = checkpointing.verify(os.path.join(checkpointing.checkpoints_dir(run), "iter_0000004"))
    assert meta["parallel"]["context_parallel_size"] == 2
    _assert_close(_losses(read_metrics(run)), _losses(read_metrics(reference)), range(1, 7), 1e-6)
    p = _train(run, nproc=1)
    assert "at iteration 4" in p.stdout
    _assert_close(_losses(read_metrics(run)), _losses(read_metrics(reference)), range(1, ITERS + 1), 1e-6)


def test_resume_at_cp2_ring(reference, tmp_path):
    """A CP=1 checkpoint resumes at CP=2 with ring attention (the tiny model's 4 heads would allow a2a too)."""
    run = str(tmp_path / "run")
    _copy_checkpoints(reference, run, names=("iter_0000004",), latest="iter_0000004")
    p = _train(run, ["parallel.context_parallel_size=2", "parallel.cp_comm=ring"])
    assert "at iteration 4" in p.stdout
    resumed = _losses(read_metrics(run))
    assert sorted(resumed) == list(range(5, ITERS + 1))
    _assert_close(resumed, _losses(read_metrics(reference)), range(5, ITERS + 1), 1e-6)


def test_context_parallel_ring_run_from_scratch(reference, tmp_path):
    """CP=2 with ring attention from the first iteration gives the DP=2 run's losses and grad norms."""
    run = str(tmp_path / "run")
    _train(run, ["parallel.context_parallel_size=2", "parallel.cp_comm=ring", "checkpoint.save_at_end=false"])
    _assert_close(_losses(read_metrics(run)), _losses(read_metrics(reference)), range(1, ITERS + 1), 1e-6)
