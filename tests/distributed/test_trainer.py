"""The rCM training loop end to end on CPU: `torchrun --nproc_per_node=2 examples/pretrain_rcm.py` (gloo), shortened
by overrides, on the shipped tiny teacher. Exact resume after a crash and after SIGTERM, TensorBoard contents,
NaN-loss skipping, bad input, generate.py's mp4, and 2 DP ranks = 1 rank with gradient accumulation."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from megatron_rcm.training.logger import METRICS_FILE, read_metrics

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHORT = ["training.train_iters=8", "rcm.tangent_warmup=3", "logging.log_interval=2", "logging.eval_interval=4",
         "logging.eval_samples=8", "logging.teacher_eval_steps=4", "checkpoint.save_interval=4",
         "training.nan_iterations=[5]"]
# phases of iterations 1..8 with tangent_warmup=3 and student_update_freq=2 (iteration i runs it = i - 1)
PHASES = ["student", "student", "student", "critic", "student", "critic", "student", "critic"]


def _env():
    # the CPU path (gloo, torch grad sync) also on a GPU node; tests/gpu/test_trainer_gpu.py covers the GPU path
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(nproc, args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            os.path.join(REPO, "examples", "pretrain_rcm.py"), *args]


def _run(cmd, env=None, timeout=300):
    p = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    return p


def _train(run_dir, extra=(), nproc=2):
    p = _run(_torchrun(nproc, [*SHORT, f"run_dir={run_dir}", *extra]))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(records):
    return {i: {k: v for k, v in r.items() if k.startswith("loss/") or k.startswith("grad_norm/")}
            for i, r in records.items()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("tiny") / "run")
    p = _train(run_dir)
    return run_dir, p.stdout + p.stderr


def test_tiny_default_end_to_end(tiny_run):
    run_dir, log = tiny_run
    m = read_metrics(run_dir)
    assert sorted(m) == list(range(1, 9))
    assert [m[i]["phase"] for i in range(1, 9)] == PHASES
    assert set(m[1]) >= {"loss/scm", "grad_norm/student", "lr/student"} and "loss/dmd" not in m[1]  # warm-up: sCM
    assert {"loss/scm", "loss/dmd"} <= set(m[5]) and "loss/critic" in m[4]
    assert "iteration        8/       8" in log and "samples/s" in log and "ETA" in log
    # the Megatron-style line of the last interval (iterations 7-8: a student and a critic step after warm-up)
    line = [ln for ln in log.splitlines() if "iteration        8/       8" in ln][0].split("] ", 1)[1]
    fields = dict(f.strip().partition(":")[::2] for f in line.split("|")[1:] if f.strip())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert list(fields)[:3] == ["consumed samples", "elapsed time per iteration (ms)",
                                "throughput per GPU (TFLOP/s/GPU)"]
    assert int(fields["consumed samples"]) == 8 * 16
    assert float(fields["throughput per GPU (TFLOP/s/GPU)"]) > 0
    assert float(fields["student step (ms)"]) > 0 and float(fields["critic step (ms)"]) > 0
    assert set(fields["learning rate"].split()[::2]) == {"critic", "student"}
    assert {"dmd", "scm", "critic", "total"} <= set(fields["loss"].split()[::2])
    assert set(fields["grad norm"].split()[::2]) == {"critic", "student"}
    assert {"rollout", "student_jvp", "teacher_cfg", "critic_grad"} <= set(fields["time (ms)"].split()[::2])
    assert "elapsed" in fields and "ETA" in fields
    assert "eval ema at iteration 8: 1-step alignment" in log
    ckpt = os.path.join(run_dir, "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000008"
    assert {"meta.json", "config.yaml", "state.json", "tensors", "ranks"} == \
        set(os.listdir(os.path.join(ckpt, "iter_0000008")))
    assert sorted(os.listdir(os.path.join(ckpt, "iter_0000008", "ranks"))) == ["rank_00000.json", "rank_00001.json"]
    assert not [f for root, _, files in os.walk(ckpt) for f in files if f.endswith((".pt", ".pth", ".pkl"))]
    assert "train_iters: 8" in open(os.path.join(ckpt, "iter_0000008", "config.yaml")).read()
    command = json.load(open(os.path.join(ckpt, "iter_0000008", "meta.json")))["command"]
    assert command.startswith("torchrun --nproc_per_node=2 ") and "examples/pretrain_rcm.py" in command
    assert command.endswith(shlex.join([*SHORT, f"run_dir={run_dir}"]))
    assert os.path.isfile(os.path.join(run_dir, "ema", "megatron_rcm.json"))


def test_nan_loss_skips_the_step_and_training_goes_on(tiny_run):
    run_dir, log = tiny_run
    m = read_metrics(run_dir)
    assert m[6]["skipped_iterations"] == 1 and m[6]["loss/total"] != m[6]["loss/total"]  # NaN
    assert "iteration 6: non-finite loss (critic phase) - step skipped" in log
    for i in (1, 2, 3, 4, 5, 7, 8):
        assert m[i]["skipped_iterations"] == 0
        assert all(v == v and abs(v) < 1e30 for k, v in m[i].items() if k.startswith("loss/"))
    # the skipped critic step did not advance the critic's LR warm-up: iteration 8 is the critic's 2nd real step
    assert m[8]["lr/critic"] == pytest.approx(m[4]["lr/critic"] * 2)


def test_tensorboard_holds_the_expected_scalars_and_videos(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tiny_run
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {"loss/scm", "loss/dmd", "loss/critic", "loss/total", "grad_norm/student", "grad_norm/critic",
                "lr/student", "lr/critic", "skipped_iterations", "throughput/samples_per_s",
                "throughput/tflops_per_gpu",
                "eval/teacher/alignment"}
    expected |= {f"eval/{net}/{k}_{n}step" for net in ("ema", "student") for k in ("alignment", "feature_distance")
                 for n in (1, 2, 4)}
    assert expected <= scalars, expected - scalars
    assert [e.step for e in acc.Scalars("loss/scm")] == [1, 2, 3, 5, 7]  # student iterations
    assert [e.step for e in acc.Scalars("eval/ema/alignment_1step")] == [0, 4, 8]
    m = read_metrics(run_dir)
    assert [e.value for e in acc.Scalars("loss/critic")][0] == pytest.approx(m[4]["loss/critic"], rel=1e-6)
    images = set(acc.Tags()["images"])
    assert {"samples/ema_1step", "samples/ema_2step", "samples/ema_4step", "samples/teacher"} <= images
    gif = acc.Images("samples/ema_4step")[-1].encoded_image_string
    assert gif[:6] in (b"GIF87a", b"GIF89a")


def test_crash_and_restart_reaches_the_same_losses_bitwise(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    resumed = str(tmp_path / "run")
    # no evaluation here: it must not matter for the trajectory either
    p1 = _train(resumed, ["logging.eval_interval=0", "checkpoint.exit_after_iteration=6"])
    assert "stopping without a checkpoint" in p1.stdout
    assert sorted(read_metrics(resumed)) == list(range(1, 7))
    p2 = _train(resumed, ["logging.eval_interval=0"])
    assert "resumed from" in p2.stdout and "at iteration 4" in p2.stdout
    assert _losses(read_metrics(resumed)) == _losses(read_metrics(run_dir))  # exact float equality


def test_sigterm_saves_and_the_same_command_resumes_exactly(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    resumed = str(tmp_path / "run")
    # a longer run (constant LR after warm-up: same trajectory) so that the signal lands mid-training
    cmd = _torchrun(2, [*SHORT, f"run_dir={resumed}", "logging.eval_interval=0", "checkpoint.save_interval=0",
                        "training.train_iters=40"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(resumed, METRICS_FILE)
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert "exiting after iteration" in out, out[-3000:]
    saved = int(open(os.path.join(resumed, "checkpoints", "latest")).read().strip().split("_")[1])
    assert 2 <= saved < 8
    _train(resumed, ["logging.eval_interval=0", "training.train_iters=8"])
    assert _losses(read_metrics(resumed)) == _losses(read_metrics(run_dir))


def test_two_ranks_equal_one_rank_with_gradient_accumulation(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    one = str(tmp_path / "one")
    _train(one, ["logging.eval_interval=0", "training.train_iters=4", "checkpoint.save_interval=0"], nproc=1)
    a, b = read_metrics(run_dir), read_metrics(one)
    for i in range(1, 5):
        for k, v in _losses({i: b[i]})[i].items():
            assert v == pytest.approx(a[i][k], rel=1e-5, abs=1e-8), (i, k)


@pytest.mark.parametrize("overrides, env, message", [
    (["model.teacher=does/not/exist"], {}, "model.teacher: 'does/not/exist' does not exist"),
    (["model.preset=wan-tiny"], {}, "does not match model.preset 'wan-tiny'"),
    (["parallel.tensor_model_parallel_size=4"], {"WORLD_SIZE": "2"}, "world size 2 is not divisible by tensor (4)"),
    (["training.global_batch_size=12"], {"WORLD_SIZE": "2"},
     "training.global_batch_size (12) must be divisible by training.micro_batch_size (8) x data-parallel size (2)"),
    (["training.train_iter=3"], {}, "unknown config key(s) ['training.train_iter']"),
    (["model.teacher="], {}, "model.teacher is empty"),
    (["data.source=latents", "data.path=does/not/exist"], {}, "data.path: 'does/not/exist' does not exist"),
])
def test_bad_input_fails_before_any_work(tmp_path, overrides, env, message):
    run_dir = str(tmp_path / "run")
    p = _run([sys.executable, os.path.join(REPO, "examples", "pretrain_rcm.py"), f"run_dir={run_dir}", *overrides],
             env={**_env(), **env}, timeout=120)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(run_dir)


def test_generate_writes_a_playable_mp4(tiny_run, tmp_path):
    import av
    import numpy as np
    from PIL import Image

    run_dir, _ = tiny_run
    for source in (run_dir, os.path.join(run_dir, "ema")):
        out = str(tmp_path / os.path.basename(source))
        p = _run([sys.executable, os.path.join(REPO, "examples", "generate.py"), "--checkpoint", source, "--steps",
                  "1", "4", "--num-prompts", "4", "--out", out], timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "4-step: 4 videos in" in p.stdout
        with av.open(os.path.join(out, "samples_4step.mp4")) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 8  # the shapes clips have 8 frames
        h, w, _ = frames[0].shape
        assert (h, w) == (66, 262)  # 1 x 4 grid of 16 x 16 clips upscaled 4x with 1-pixel borders, padded to even
        assert np.std(frames[0]) > 1
        # the labelled grid (evaluation.labeled_grid: first / middle / last frame per cell, tested pixel for pixel in
        # tests/unit/tools/test_generate.py) is wider than the 4 clips side by side
        grid = Image.open(os.path.join(out, "grid.png"))
        assert grid.size[0] > 3 * 4 * 16 * 4 and np.std(np.asarray(grid)) > 1
        timings = json.load(open(os.path.join(out, "timings.json")))
        assert set(timings["steps"]) == {"1", "4"}
