"""The lockstep coroutines behind the pipelined no-grad passes (training/schedules.py), in one process: each
micro-batch's code runs until its next network call, the calls of a round are executed together in micro-batch
order, finished micro-batches drop out, the pass names reach the calls, and errors come back to the caller."""

import pytest
import torch

from megatron_rcm.training import schedules


class _Call:
    def __init__(self, value):
        self.value, self.pass_name = value, ""


def _job(m, n):
    """Micro-batch m: n dependent calls (each on the previous call's result)."""

    def run():
        co = schedules.current_coroutine()
        assert co is not None and not torch.is_grad_enabled()
        x = torch.tensor(float(m))
        for k in range(n):
            co.passes.append(f"pass{k}")
            x = co.post(_Call(x))
            co.passes.pop()
        return x

    return run


def test_rounds_hold_one_call_per_unfinished_micro_batch_in_order():
    rounds = []

    def execute(calls):
        rounds.append([(float(c.value), c.pass_name) for c in calls])
        return [c.value * 10 + 1 for c in calls]

    times = {}
    out = schedules.run_lockstep([_job(1, 3), _job(2, 1), _job(3, 2)], execute, torch.device("cpu"), times)
    assert [float(v) for v in out] == [1111.0, 21.0, 311.0]
    assert rounds == [[(1.0, "pass0"), (2.0, "pass0"), (3.0, "pass0")],
                      [(11.0, "pass1"), (31.0, "pass1")],
                      [(111.0, "pass2")]]
    assert set(times) == {"pass0", "pass1", "pass2"} and all(v >= 0 for v in times.values())
    assert schedules.current_coroutine() is None


def test_no_calls_and_errors():
    assert schedules.run_lockstep([lambda: 5, lambda: 6], lambda calls: [], torch.device("cpu")) == [5, 6]

    def bad():
        schedules.current_coroutine().post(_Call(torch.tensor(0.0)))
        raise ValueError("micro-batch 1 failed")

    with pytest.raises(ValueError, match="micro-batch 1 failed"):
        schedules.run_lockstep([_job(0, 2), bad], lambda calls: [c.value for c in calls], torch.device("cpu"))


def test_unknown_schedule_kind_is_refused():
    with pytest.raises(ValueError, match="auto, megatron or gloo"):
        schedules.build_schedule(torch.device("cpu"), torch.float32, "interleaved")
