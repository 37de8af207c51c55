"""The gloo pipeline schedule (training/schedules.py) on 3 processes (PP=3, one block per stage, float64) against
the same Wan model on one process: a forward-only round mixing plain, doubled-batch and JVP calls returns every
call's output on every stage, and 1F1B over 4 micro-batches (warm-up, steady state and drain all differ per stage)
leaves the gradients of the summed losses in the parameters and every loss on every stage."""

import dataclasses

import pytest
import torch

from megatron_rcm.parallel import run_on_ranks

pytestmark = pytest.mark.distributed

F64 = torch.float64
SHAPE = (2, 4, 1, 6, 6)


def _model(config, layers=None):
    from megatron_rcm.models import WanModel

    torch.manual_seed(0)
    return WanModel(config, params_dtype=F64, pipeline_layers=layers)


def _inputs(layout, m, batch):
    g = torch.Generator().manual_seed(10 + m)
    x = torch.randn((batch, *SHAPE[1:]), generator=g, dtype=F64)
    t = torch.rand(batch, generator=g, dtype=F64) * 1000
    text = torch.randn(batch, 5, 16, generator=g, dtype=F64)
    lay = dataclasses.replace(layout, shape=(batch, *SHAPE[1:]))
    tangent = torch.randn_like(x), torch.randn(batch, generator=g, dtype=F64) * 100
    weight = torch.randn_like(lay.shard(x))
    return lay, lay.shard(x), t, text, (lay.shard(tangent[0]), tangent[1]), weight


def _check():
    from megatron_rcm.checkpoint.sharding import full_state_dict, load_full_state_dict
    from megatron_rcm.models import get_preset
    from megatron_rcm.models.loading import _stage_state_dict
    from megatron_rcm.parallel import initialize_parallel
    from megatron_rcm.parallel.pipeline import gather_pipeline_state_dict, sum_pipeline_grads
    from megatron_rcm.training import schedules

    _, config = get_preset("wan-tiny")
    config = dataclasses.replace(config, num_layers=3)
    initialize_parallel()
    ref = _model(config)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    layout = ref.token_layout(SHAPE)
    batches = [2, 4, 2, 2]  # a CFG-sized call in the round
    calls = [_inputs(layout, m, b) for m, b in enumerate(batches)]
    expected_round = []
    for m, (lay, tokens, t, text, (tx, tt), _) in enumerate(calls):
        if m == 2:
            expected_round.append(ref.jvp_tokens(tokens, t, text, lay, tx, tt))
        else:
            with torch.no_grad():
                expected_round.append(ref.forward_tokens(tokens, t, text, lay))
    total = sum((ref.forward_tokens(tokens, t, text, lay) * w).sum() for lay, tokens, t, text, _, w in calls)
    total.backward()
    expected_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    expected_losses = [float((ref.forward_tokens(tokens, t, text, lay) * w).sum())
                       for lay, tokens, t, text, _, w in calls]
    sd = full_state_dict(ref)

    initialize_parallel(pipeline_model_parallel_size=3)
    model = _model(config, [1, 1, 1])
    load_full_state_dict(model, _stage_state_dict(model, sd, "reference"))
    schedule = schedules.GlooSchedule(torch.device("cpu"))

    round_calls = [schedules.StageCall(model, tokens, t, text, lay, jvp=(m == 2), tokens_tangent=tx if m == 2 else None,
                                       timestep_tangent=tt if m == 2 else None)
                   for m, (lay, tokens, t, text, (tx, tt), _) in enumerate(calls)]
    for m, (got, want) in enumerate(zip(schedule.forward_only(round_calls), expected_round)):
        for a, b in zip(got if m == 2 else (got,), want if m == 2 else (want,)):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), m

    from megatron_rcm.training.step import MicroBatchLoss

    def loss_fn(w):
        def run(y):
            value = (y * w).sum().reshape(1)
            return MicroBatchLoss(value, {"loss/x": value.detach()}, value.detach())
        return run

    items = [schedules.GradItem(schedules.StageCall(model, tokens, t, text, lay), loss_fn(w),
                                lambda out: out.loss.sum(), ("loss/x",), 1)
             for lay, tokens, t, text, _, w in calls]
    losses = schedule.forward_backward(items)
    for got, want in zip(losses, expected_losses):
        assert float(got.parts["loss/x"]) == pytest.approx(want, rel=1e-10)
        assert float(got.total) == pytest.approx(want, rel=1e-10)
    sum_pipeline_grads(model)
    grads = gather_pipeline_state_dict({n: p.grad for n, p in model.named_parameters()})
    assert set(grads) == set(expected_grads)
    for n, g in grads.items():
        assert torch.allclose(g, expected_grads[n], rtol=1e-9, atol=1e-12), n


def test_gloo_schedule_matches_one_process():
    run_on_ranks(_check, 3)
