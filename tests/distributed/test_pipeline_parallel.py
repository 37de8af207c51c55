"""Wan and Cosmos in pipeline stages (4 gloo processes, float64): PP=2 x DP=2 with uneven explicit splits, PP=2 x
TP=2 (with sequence parallelism) and PP=2 x CP=2, against the same weights at PP=1.

Per case: the forward with and without autograd, the JVP along the latents, the timestep and both, every gradient
after one backward (pipeline-replicated ones summed over the stages, CP-summed, TP-gathered, then gathered over
the stages) and the stage entry points driven as a schedule would (`set_input_tensor`, `stage_forward`, one
send per stage boundary). A frozen first stage does not make the others wait in backward. Then a checkpoint written at PP=2 (megatron and diffusers) loads at PP=2 and at PP=1
bit-exactly, and bad splits are refused.
"""

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit", "models"))

from megatron_rcm.parallel import run_on_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

F64 = torch.float64


def _config(kind, preset, layers):
    from megatron_rcm.models import get_preset

    name, config = get_preset(preset)
    assert name == kind
    return dataclasses.replace(config, num_layers=layers)


# (label, family, preset, blocks, pipeline_layers, tp, cp, sequence_parallel, latent shape [B, C, T, H, W])
CASES = [
    ("wan pp2 [1,2]", "wan", "wan-tiny", 3, [1, 2], 1, 1, False, (2, 4, 1, 6, 6)),
    ("cosmos pp2 [2,1]", "cosmos", "cosmos-tiny", 3, [2, 1], 1, 1, False, (2, 4, 1, 6, 6)),
    ("wan pp2 x tp2 sp", "wan", "wan-tiny-tp", 3, [2, 1], 2, 1, True, (2, 4, 1, 4, 4)),
    ("cosmos pp2 x tp2", "cosmos", "cosmos-tiny-tp", 3, None, 2, 1, False, (2, 4, 1, 6, 6)),
    ("wan pp2 x cp2", "wan", "wan-tiny", 3, [1, 2], 1, 2, False, (2, 4, 1, 6, 6)),
    ("cosmos pp2 x cp2", "cosmos", "cosmos-tiny-learnable", 3, [2, 1], 1, 2, False, (2, 4, 1, 6, 6)),
]


def _model_cls(kind):
    from megatron_rcm.models import CosmosModel, WanModel

    return {"wan": WanModel, "cosmos": CosmosModel}[kind]


def _inputs(kind, shape):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=F64)
    t = torch.rand(shape[0], generator=g, dtype=F64) * (1000 if kind == "wan" else 1)
    text = torch.randn(shape[0], 5, 16, generator=g, dtype=F64)
    w = torch.randn(shape, generator=g, dtype=F64)
    tx = torch.randn(shape, generator=g, dtype=F64)
    tt = torch.randn(shape[0], generator=g, dtype=F64) * (100 if kind == "wan" else 0.1)
    tangents = {"latents": (tx, torch.zeros_like(t)), "timestep": (torch.zeros_like(x), tt), "both": (tx, tt)}
    return x, t, text, w, tangents


def _reference(kind, config, shape):
    """The PP=1 (TP=1, CP=1) model: weights, output, gradients, JVPs."""
    from megatron_rcm.checkpoint.sharding import full_state_dict

    torch.manual_seed(0)
    model = _model_cls(kind)(config, params_dtype=F64)
    with torch.no_grad():  # non-trivial head modulation / biases everywhere
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, text, w, tangents = _inputs(kind, shape)
    out = model(x, t, text)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    jvps = {name: model.jvp(x, t, text, *pair) for name, pair in tangents.items()}
    return dict(sd=full_state_dict(model), out=out.detach(), grads=grads, jvps=jvps)


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _check_case(label, kind, config, layers, sp, shape, ref):
    from megatron_rcm.checkpoint.sharding import gather_grads, load_full_state_dict
    from megatron_rcm.models.loading import _stage_state_dict
    from megatron_rcm.parallel import cp_group, pp_rank
    from megatron_rcm.parallel.context import sum_context_parallel_grads
    from megatron_rcm.parallel.pipeline import gather_pipeline_state_dict, sum_pipeline_grads

    model = _model_cls(kind)(config, params_dtype=F64, sequence_parallel=sp, pipeline_layers=layers)
    st = model.stage
    expected = layers or [2, 1]
    assert st.layers == tuple(expected) and len(model.blocks) == expected[pp_rank()], label
    names = [n for n, _ in model.named_parameters()]
    first = sum(expected[:pp_rank()])
    blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.")})
    assert blocks == list(range(first, first + expected[pp_rank()])), (label, blocks)
    assert any(n.startswith("patch_embedding") for n in names) == st.is_first, label
    assert any(n.startswith("head") for n in names) == st.is_last, label
    load_full_state_dict(model, _stage_state_dict(model, ref["sd"], "reference"))

    x, t, text, w, tangents = _inputs(kind, shape)
    out = model(x, t, text)
    assert _err(out.detach(), ref["out"]) <= 1e-5, f"{label} forward"
    with torch.no_grad():
        assert _err(model(x, t, text), ref["out"]) <= 1e-5, f"{label} no-grad forward"
    (out * w).sum().backward()
    sum_context_parallel_grads(model, cp_group())
    sum_pipeline_grads(model)
    grads = gather_pipeline_state_dict(gather_grads(model))
    assert set(grads) == set(ref["grads"]), label
    for name, g in grads.items():
        assert _err(g, ref["grads"][name]) <= 1e-4, f"{label} grad {name}"
    model.zero_grad()

    for name, pair in tangents.items():
        o, to = model.jvp(x, t, text, *pair)
        eo, eto = ref["jvps"][name]
        assert _err(o, eo) <= 1e-5 and _err(to, eto) <= 1e-5, f"{label} jvp({name})"

    # the stage entry points, driven as a schedule would: one send per boundary, the last stage's result
    from megatron_rcm.parallel import pipeline

    layout = model.token_layout(x.shape)
    local = layout.shard(x)
    tx, tt = tangents["both"]
    for jvp in (False, True):
        kw = dict(jvp=True, tokens_tangent=layout.shard(tx), timestep_tangent=tt) if jvp else {}
        if not st.is_first:
            model.set_input_tensor([pipeline.recv_tensor(pipeline.prev_rank())])
        res = model.stage_forward(local if st.is_first else None, t, text, layout, **kw)
        if not st.is_last:
            assert tuple(res.shape) == model.stage_activation_shape(layout, jvp), label
            pipeline.send_tensor(res, pipeline.next_rank())
            continue
        if jvp:
            assert _err(layout.gather(res[1]), ref["jvps"]["both"][1]) <= 1e-5, f"{label} stage jvp"
        else:
            assert _err(layout.gather(res.detach()), ref["out"]) <= 1e-5, f"{label} stage forward"
    return model


def _check_checkpoints(tmp, model, kind, config, ref):
    """A PP=2 model's megatron and diffusers checkpoints, read back at PP=1, are the reference weights exactly."""
    from megatron_rcm.checkpoint import hf
    from megatron_rcm.models.loading import ARCHITECTURES, from_pretrained, save_diffusers, save_megatron
    from megatron_rcm.parallel import initialize_parallel

    save_megatron(model, os.path.join(tmp, "megatron"))
    save_diffusers(model, os.path.join(tmp, "diffusers"))
    for folder in ("megatron", "diffusers"):  # and back into PP=2 stages
        net = from_pretrained(os.path.join(tmp, folder), params_dtype=F64, pipeline_layers=list(model.stage.layers))
        mine = dict(model.named_parameters())
        assert [n for n, _ in net.named_parameters()] == list(mine), folder
        for name, p in net.named_parameters():
            assert torch.equal(p.detach(), mine[name].detach()), f"{folder} at PP=2: {name}"
    initialize_parallel()
    net = from_pretrained(os.path.join(tmp, "megatron"), params_dtype=F64)
    sd = dict(net.named_parameters())
    assert set(sd) == set(ref["sd"])
    for name, p in sd.items():
        assert torch.equal(p.detach(), ref["sd"][name]), f"megatron checkpoint {name}"
    arch = ARCHITECTURES[kind]
    back = arch.hf_to_mcore(hf.read_state_dict(os.path.join(tmp, "diffusers")), config)
    assert set(back) == set(ref["sd"])
    for name, v in back.items():
        assert torch.equal(v.to(F64), ref["sd"][name]), f"diffusers export {name}"


def _check_frozen_first_stage(model, kind, shape, ref):
    """A first stage that takes no part in autograd (frozen) sends no gradient request: the later stages' backward
    does not wait for it and their own gradients are unchanged."""
    x, t, text, w, _ = _inputs(kind, shape)
    if model.stage.is_first:
        for p in model.parameters():
            p.requires_grad_(False)
    model.zero_grad()
    (model(x, t, text) * w).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and not model.stage.is_first:
            assert _err(p.grad, ref["grads"][name]) <= 1e-4, f"frozen first stage: {name}"
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()


def _check_bad_splits(kind, config):
    for layers, what in (([3, 0], "at least one"), ([1, 1], "sum to num_layers=3"), ([1, 1, 1], "each of the 2")):
        with pytest.raises(ValueError, match=what):
            _model_cls(kind)(config, params_dtype=F64, pipeline_layers=layers)


def _all(tmp):
    from megatron_rcm.parallel import initialize_parallel

    for i, (label, kind, preset, n, layers, tp, cp, sp, shape) in enumerate(CASES):
        config = _config(kind, preset, n)
        initialize_parallel()
        ref = _reference(kind, config, shape)
        initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=2)
        model = _check_case(label, kind, config, layers, sp, shape, ref)
        if i == 0:
            _check_frozen_first_stage(model, kind, shape, ref)
            _check_bad_splits(kind, config)
            _check_checkpoints(tmp, model, kind, config, ref)


def test_pipeline_stages_match_one_stage(tmp_path):
    run_on_ranks(_all, 4, str(tmp_path))
