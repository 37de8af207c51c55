"""The sbatch path on a real Slurm cluster on this host (scripts/local_slurm.sh: munged, slurmctld, two slurmd
nodes): slurm/wan13b_rcm.sbatch runs the tiny default (shortened, CPU, gloo, one process on each of 2 nodes) to
completion; a job pre-empted with SIGUSR1 saves, requeues itself, resumes, and its per-iteration losses equal the
uninterrupted run's bitwise; a job that reaches its real time limit (`--time=2 --signal=B:USR1@85`) does the same
from Slurm's own signal."""

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from megatron_rcm.training.logger import METRICS_FILE, read_metrics

pytestmark = pytest.mark.distributed

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ITERS = 16
SHORT = [f"training.train_iters={ITERS}", "training.global_batch_size=4", "training.micro_batch_size=2",
         "rcm.tangent_warmup=3", "logging.log_interval=1", "logging.eval_interval=0", "logging.tensorboard=false",
         "checkpoint.save_interval=0"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _free_ports(n: int) -> int:
    """A base port with n free consecutive ports."""
    for _ in range(100):
        base = random.randrange(20000, 40000)
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("slurmctld") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("slurm-wlm is not installed and cannot be installed here (needs root and apt-get)")
    state = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")  # short: munge's socket path has a length limit
    env = dict(os.environ, LOCAL_SLURM_DIR=state, LOCAL_SLURM_PORT=str(_free_ports(3)))
    script = os.path.join(REPO, "scripts", "local_slurm.sh")
    up = subprocess.run(["bash", script, "up"], env=env, capture_output=True, text=True, timeout=300)
    if up.returncode and "apt-get install slurm-wlm failed" in up.stderr:
        pytest.skip(f"apt-get cannot install slurm-wlm: {up.stderr.strip()}")
    assert up.returncode == 0, up.stdout + up.stderr
    env["SLURM_CONF"] = os.path.join(state, "slurm.conf")
    try:
        yield env
    finally:
        down = subprocess.run(["bash", script, "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not os.path.exists(state)


def _sbatch(env, run_dir, out, extra=(), overrides=SHORT):
    job_env = dict(env, CONFIG="examples/configs/shapes-tiny.yaml", GPUS_PER_NODE="1", PYTHON=sys.executable,
                   MASTER_PORT=str(_free_ports(1)), RUN_DIR=run_dir, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        job_env.pop(k, None)
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
           f"--output={out}", *extra, os.path.join(REPO, "slurm", "wan13b_rcm.sbatch"), *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _job(env, job) -> dict:
    """The job's `scontrol show job` fields. Asked up to three times: on a loaded host the controller can miss a
    reply (scontrol's message timeout), which says nothing about the job."""
    errors = []
    for _ in range(3):
        try:
            p = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                               timeout=30)
        except subprocess.TimeoutExpired:
            errors.append("scontrol did not answer in 30 s")
            continue
        if p.returncode == 0:
            return dict(f.split("=", 1) for f in p.stdout.split() if "=" in f)
        errors.append(p.stderr.strip())
        time.sleep(1)
    pytest.fail(f"scontrol show job {job}: " + " | ".join(errors))


def _wait(env, job, out, timeout=200) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        info = _job(env, job)
        if info["JobState"] in DONE:
            return info
        time.sleep(0.5)
    log = open(out).read() if os.path.exists(out) else ""
    pytest.fail(f"job {job} not done after {timeout} s: {info['JobState']}\n{log[-3000:]}")


def _state(info) -> str:
    return " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "ExitCode", "Restarts"))


def _losses(run_dir):
    return {i: {k: v for k, v in r.items() if k.startswith(("loss/", "grad_norm/", "lr/")) or k == "phase"}
            for i, r in read_metrics(run_dir).items()}


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Both jobs at once (their start-ups overlap): an uninterrupted one, and one pre-empted with SIGUSR1 right
    after its first iteration (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@N` does at the time limit)."""
    d = tmp_path_factory.mktemp("slurm")
    runs = {name: (str(d / name / "run"), str(d / f"{name}.out")) for name in ("complete", "preempted")}
    ids = {name: _sbatch(cluster, run_dir, out) for name, (run_dir, out) in runs.items()}
    run_dir, out = runs["preempted"]
    metrics = os.path.join(run_dir, METRICS_FILE)
    end = time.time() + 300
    while not (os.path.exists(metrics) and read_metrics(run_dir)):
        assert time.time() < end and _job(cluster, ids["preempted"])["JobState"] not in DONE, \
            open(out).read()[-3000:]
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", "--batch", ids["preempted"]], env=cluster, check=True, timeout=30)
    return {name: (ids[name], *runs[name]) for name in runs}


def test_sbatch_runs_the_tiny_default_to_completion(cluster, jobs):
    job, run_dir, out = jobs["complete"]
    info = _wait(cluster, job, out)
    log = open(out).read()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _state(info) + "\n" + log[-3000:]
    assert "on 2 node(s) [n[1-2]] x 1 process(es) = world 2" in log
    assert "TP 1 x CP 1 x PP 1 x DP 2 | micro-batch 2 x 1" in log  # the resolved layout, printed at start
    assert "global batch 4 = micro 2 x 1 x DP 2" in log
    assert sorted(read_metrics(run_dir)) == list(range(1, ITERS + 1))
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", latest))


def test_preempted_job_requeues_and_resumes_the_same_trajectory(cluster, jobs):
    job, run_dir, out = jobs["preempted"]
    reference_job, reference, reference_out = jobs["complete"]
    info = _wait(cluster, job, out, timeout=300)
    log = open(out).read()  # --open-mode=append: both runs of the job
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", _state(info) + "\n" + log[-3000:]
    assert "asking the workers to save a checkpoint and stop" in log and "requeueing job" in log
    assert "job %s (restart 1)" % job in log
    resumed_at = int(log.split("resumed from")[1].split("at iteration")[1].split()[0])
    assert 1 <= resumed_at < ITERS, "the signal came after the last iteration: the test did not cut the run"
    assert _wait(cluster, reference_job, reference_out)["JobState"] == "COMPLETED"
    assert _losses(run_dir) == _losses(reference)  # bitwise: floats compared with ==


# Long enough that the first run of the time-limited job is still training when Slurm's warning comes (at most
# 35 s after its start, see `time_limited`)
LONG_ITERS = 200
LONG = [o if not o.startswith("training.train_iters=") else f"training.train_iters={LONG_ITERS}" for o in SHORT]
# Slurm's time-limit check runs every 30 s and sends the `--signal` warning once fewer than N + 30 s are left: with
# a 2-minute limit and N = 85 it comes 5 to 35 s after the start (not in the first seconds, before the batch shell
# has its trap), and the job is ended at the first check past its limit, 120 to 150 s after the start, which leaves
# the workers at least 85 s from the warning to save
TIME_LIMIT = ["--time=2", "--signal=B:USR1@85"]


@pytest.fixture(scope="module")
def time_limited(cluster, tmp_path_factory, jobs):
    """A job with a 2-minute limit (TIME_LIMIT), cut by Slurm's own warning; its requeued run would get the same
    limit and be cut again, so once the first run has requeued itself the test raises the limit (scontrol update:
    the pending job's limit; the requeued run may not start for a few seconds, see local_slurm.sh) and the second
    run finishes. Next to it the uninterrupted run of the same length. Started after the other jobs have been
    submitted (`jobs`)."""
    d = tmp_path_factory.mktemp("slurm-time")
    runs = {name: (str(d / name / "run"), str(d / f"{name}.out")) for name in ("reference", "limited")}
    ids = {"reference": _sbatch(cluster, *runs["reference"], overrides=LONG),
           "limited": _sbatch(cluster, *runs["limited"], extra=TIME_LIMIT, overrides=LONG)}
    job, (run_dir, out) = ids["limited"], runs["limited"]
    end = time.time() + 240
    while True:
        info = _job(cluster, job)
        if int(info.get("Restarts", "0")) >= 1:
            break
        assert time.time() < end and info["JobState"] not in DONE, \
            f"{info['JobState']}\n" + (open(out).read()[-3000:] if os.path.exists(out) else "")
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], env=cluster, check=True, timeout=30)
    assert _job(cluster, job)["TimeLimit"] == "00:10:00"
    return {name: (ids[name], *runs[name]) for name in runs}


def test_time_limited_job_requeues_and_resumes_the_same_trajectory(cluster, time_limited):
    job, run_dir, out = time_limited["limited"]
    reference_job, reference, reference_out = time_limited["reference"]
    info = _wait(cluster, job, out, timeout=300)
    log = open(out).read()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", _state(info) + "\n" + log[-3000:]
    first = log.split("job %s (restart 1)" % job)[0]  # the first run's part of the log
    assert "asking the workers to save a checkpoint and stop" in first and "requeueing job" in first, first[-3000:]
    assert "exiting after iteration" in first  # the workers saved on the signal, not killed at the time limit
    resumed_at = int(log.split("resumed from")[1].split("at iteration")[1].split()[0])
    assert 1 <= resumed_at < LONG_ITERS, "the time limit came after the last iteration: the run was not cut"
    assert _wait(cluster, reference_job, reference_out, timeout=300)["JobState"] == "COMPLETED"
    assert sorted(read_metrics(run_dir)) == list(range(1, LONG_ITERS + 1))
    assert _losses(run_dir) == _losses(reference)  # bitwise: floats compared with ==
