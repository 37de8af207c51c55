import re

from megatron_rcm.training.logger import TrainingLogger


def _parse(line: str) -> dict:
    fields = [f.strip() for f in line.split("|") if f.strip()]
    out = {"iteration": fields[0]}
    for f in fields[1:]:
        k, _, v = f.partition(":")
        out[k.strip()] = v.strip()
    return out


def test_console_line_has_megatron_fields(tmp_path, capsys):
    log = TrainingLogger(str(tmp_path), True, False, train_iters=4, log_interval=2)
    log.start(0)
    for it in range(2):
        log.iteration(it, {"phase": "student" if it == 0 else "critic", "loss/scm": 1.0 + it,
                           "grad_norm/student": 3.0 if it == 0 else None, "lr/student": 1e-5, "lr/critic": 2e-5,
                           "nan_grads/student": 0, "skipped_iterations": it, "time/teacher_cfg": 0.0123},
                      samples=16, flops=2e12)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    f = _parse(line.split("] ", 1)[1])
    assert re.fullmatch(r"iteration\s+2/\s+4", f["iteration"])
    assert f["consumed samples"] == "32"
    assert float(f["elapsed time per iteration (ms)"]) >= 0
    assert float(f["throughput per GPU (TFLOP/s/GPU)"]) > 0
    assert "student step (ms)" in f and "critic step (ms)" in f
    assert f["learning rate"] == "critic 2.000E-05 student 1.000E-05"
    assert f["loss"] == "scm 1.5000E+00"
    assert f["grad norm"] == "student 3.0000E+00"
    assert f["number of skipped iterations"] == "1"
    assert f["number of nan iterations"] == "0"
    assert f["time (ms)"] == "teacher_cfg 12.3"
    assert list(f)[:4] == ["iteration", "consumed samples", "elapsed time per iteration (ms)",
                           "throughput per GPU (TFLOP/s/GPU)"]


def test_without_flops_or_pass_times(tmp_path, capsys):
    log = TrainingLogger(str(tmp_path), True, False, train_iters=1, log_interval=5)
    log.start(0)
    log.iteration(0, {"phase": "student", "loss/total": 0.5}, samples=4)
    f = _parse(capsys.readouterr().out.strip().split("] ", 1)[1])
    assert "throughput per GPU (TFLOP/s/GPU)" not in f and "time (ms)" not in f
    assert f["consumed samples"] == "4" and f["loss"] == "total 5.0000E-01"
