"""megatron-core's pipeline schedule (`get_forward_backward_func`) driving the rCM passes on one GPU: the tiny
default with `parallel.pp_schedule=megatron` (forward-only rounds for the no-grad passes, forward-backward for the
with-grad pass, megatron DDP) gives the losses and grad norms of the same run without a schedule and of the gloo
stand-in (`parallel.pp_schedule=gloo`) on the same GPU. At PP=1 megatron picks its no-pipelining schedule; the
1F1B runs over NCCL between GPUs are in the two-GPU tests.

Run: pytest -m gpu tests/gpu/test_schedules_gpu.py
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer_gpu import _assert_same_losses, _need, _train  # noqa: E402

from megatron_rcm.training.logger import read_metrics  # noqa: E402

pytestmark = pytest.mark.gpu


def test_megatron_and_gloo_schedules_give_the_unscheduled_losses(tmp_path):
    _need(1)
    common = ["training.train_iters=6", "parallel.grad_sync=megatron", "checkpoint.save_at_end=false"]
    runs = {}
    for name, extra in (("plain", []), ("megatron", ["parallel.pp_schedule=megatron"]),
                        ("gloo", ["parallel.pp_schedule=gloo"])):
        _train(str(tmp_path / name), 1, [*common, *extra])
        runs[name] = read_metrics(tmp_path / name)
    for name in ("megatron", "gloo"):
        _assert_same_losses(runs["plain"], runs[name], range(1, 7), rel=1e-5, prefixes=("loss/", "grad_norm/"))
        assert runs[name][5]["time/student_grad"] > 0 and runs[name][5]["time/rollout"] > 0
