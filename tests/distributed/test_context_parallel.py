"""Wan and Cosmos under context parallelism (4 gloo processes): CP=2 (x DP=2), CP=4 and TP=2 x CP=2, Ulysses
all-to-all and ring attention, against diffusers' single-process model in float64.

Every case has a token count the CP size does not divide (padding); the ring cases include head counts it does not
divide. Checked per case: the forward with and without autograd, the JVP along the latents, the timestep and both (against torch.func.jvp over
diffusers: exact merge rule), the gradients of every parameter after one backward through the public API and
through the sharded entry point (summed over CP, gathered over TP), and the sharded layout's helpers.
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


def _wan_case(preset_or_config, shape):
    from wan_float64_reference import float64_diffusers, reference_jvp
    from wan_reference import diffusers_wan, inputs, megatron_state_dict

    from megatron_rcm.checkpoint import wan as wan_keys
    from megatron_rcm.models.wan import PRESETS

    config = PRESETS[preset_or_config] if isinstance(preset_or_config, str) else preset_or_config
    with float64_diffusers():
        ref = diffusers_wan(config, dtype=F64)
        ref.rope.__init__(ref.config.attention_head_dim, ref.config.patch_size, ref.config.rope_max_seq_len)
    x, t, text = inputs(*shape, dtype=F64)
    kw = {}

    def run(x, t):
        return ref(x, t, text, return_dict=False)[0]

    with float64_diffusers():
        return _expectations(ref, run, lambda tx, tt: reference_jvp(ref, x, t, text, tx, tt), x, t, text, kw,
                             megatron_state_dict(ref),
                             lambda: wan_keys.hf_to_mcore({n: p.grad for n, p in ref.named_parameters()},
                                                          config.num_attention_heads),
                             ("wan", config))


def _cosmos_case(config, shape, video2world=False):
    from cosmos_reference import diffusers_cosmos, float64_cosmos, inputs, megatron_grads, megatron_state_dict, reference
    from cosmos_reference import reference_jvp

    with float64_cosmos():
        ref = diffusers_cosmos(config, dtype=F64)
    x, t, text = inputs(*shape, dtype=F64)
    kw = {}
    if video2world:  # condition mask, per-frame timesteps, fps
        b, f = shape[0], shape[1]
        mask = torch.zeros(b, 1, *x.shape[2:], dtype=F64)
        mask[:, :, :1] = 1
        t = torch.stack([torch.full((b,), 1e-4, dtype=F64)] + [t * (i + 1) / f for i in range(f - 1)], 1)
        kw = dict(condition_mask=mask, fps=16)
    with float64_cosmos():
        return _expectations(ref, lambda x, t: reference(ref, x, t, text, **kw),
                             lambda tx, tt: reference_jvp(ref, x, t, text, tx, tt, **kw), x, t, text, kw,
                             megatron_state_dict(ref), lambda: megatron_grads(ref), ("cosmos", config))


def _expectations(ref, run, run_jvp, x, t, text, kw, state_dict, ref_grads, model):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(x.shape, generator=g, dtype=F64)
    ref.zero_grad()
    out = run(x, t)
    (out * w).sum().backward()
    tx = torch.randn(x.shape, generator=g, dtype=F64)
    tt = 100 * torch.randn(t.shape, generator=g, dtype=F64)
    tangents = {"latents": (tx, torch.zeros_like(t)), "timestep": (torch.zeros_like(x), tt), "both": (tx, tt)}
    jvps = {name: run_jvp(*pair) for name, pair in tangents.items()}
    return dict(x=x, t=t, text=text, kw=kw, w=w, out=out.detach(), grads=ref_grads(), tangents=tangents,
                jvps={k: tuple(v.detach() for v in pair) for k, pair in jvps.items()},
                state_dict={k: v.detach() for k, v in state_dict.items()}, model=model)


def _build(case, **kw):
    from megatron_rcm.models.cosmos import CosmosModel
    from megatron_rcm.models.wan import WanModel

    kind, config = case["model"]
    return {"wan": WanModel, "cosmos": CosmosModel}[kind](config, params_dtype=F64, **kw)


def _check(case, comm, sp, label):
    from wan_reference import relative_error

    from megatron_rcm.checkpoint.sharding import gather_grads, load_full_state_dict
    from megatron_rcm.parallel import cp_group, cp_size, tp_size
    from megatron_rcm.parallel.context import sum_context_parallel_grads

    x, t, text, kw, w = case["x"], case["t"], case["text"], case["kw"], case["w"]
    model = _build(case, sequence_parallel=sp, cp_comm=comm)
    load_full_state_dict(model, case["state_dict"])
    layout = model.token_layout(x.shape)
    split = layout.split
    assert split.size == cp_size() and split.comm == (comm if comm != "auto" else split.comm), label
    assert split.tokens % split.size, f"{label}: the case must need padding"

    # no rank runs a block on more than its tokens (under SP: its share of them)
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    out = model(x, t, text, **kw)
    hook.remove()
    assert seen == [split.chunk // (tp_size() if model.sequence_parallel else 1)], (label, seen)
    assert relative_error(out.detach(), case["out"]) <= 1e-6, f"{label} forward"
    with torch.no_grad():  # the plain pass (teacher, critic targets): no autograd Function on the ring
        assert relative_error(model(x, t, text, **kw), case["out"]) <= 1e-6, f"{label} no-grad forward"

    def check_grads(what):
        sum_context_parallel_grads(model, cp_group())
        grads = gather_grads(model)
        assert set(grads) == set(case["grads"]), label
        for name, g in grads.items():
            assert relative_error(g, case["grads"][name]) <= 1e-4, f"{label} {what} grad {name}"
        model.zero_grad()

    (out * w).sum().backward()
    check_grads("public")

    for name, (tx, tt) in case["tangents"].items():
        o, to = model.jvp(x, t, text, tx, tt, **kw)
        eo, eto = case["jvps"][name]
        assert relative_error(o, eo) <= 1e-6, f"{label} jvp({name}) output"
        assert relative_error(to, eto) <= 1e-6, f"{label} jvp({name}) tangent"
        assert eto.abs().max() > 1e-3

    # the sharded entry point: this rank's tokens in and out, zeros on padding, gathered = the complete result
    local = layout.shard(x)
    assert local.shape == (x.shape[0], split.chunk, x.shape[1] * 4)
    y = model.forward_tokens(local, t, text, layout, **kw)
    assert torch.all(y[:, ~layout.mask()] == 0), label
    assert relative_error(layout.gather(y.detach()), case["out"]) <= 1e-6, f"{label} sharded forward"
    (y * layout.shard(w)).sum().backward()
    check_grads("sharded")
    tx, tt = case["tangents"]["both"]
    y, ty = model.jvp_tokens(local, t, text, layout, layout.shard(tx), tt, **kw)
    assert relative_error(layout.gather(ty), case["jvps"]["both"][1]) <= 1e-6, f"{label} sharded jvp"


def _check_layout_helpers(case):
    from megatron_rcm.diffusion.reduce import per_sample_sum, process_group_sum
    from megatron_rcm.parallel import cp_group, cp_size

    model = _build(case)
    x = case["x"]
    layout = model.token_layout(x.shape)
    total = torch.tensor([layout.real_tokens])
    torch.distributed.all_reduce(total, group=cp_group())
    assert total.item() == layout.split.tokens
    # noise: this rank's slice of the full-sample draw an unsharded run makes
    local = layout.shard(x)
    noise = layout.noise_fn(torch.Generator().manual_seed(3))(local)
    full = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(noise, layout.shard(full))
    # per-sample sums over sharded tokens, all-reduced over CP, are the full sums
    sums = per_sample_sum(layout.shard(x), process_group_sum(cp_group()))
    assert torch.allclose(sums, x.flatten(1).sum(1), rtol=1e-12), cp_size()


def _bad_inputs():
    from wan_reference import inputs

    from megatron_rcm.models.wan import PRESETS, WanModel
    from megatron_rcm.parallel import cp_size

    three_heads = dataclasses.replace(PRESETS["wan-tiny"], num_attention_heads=3)
    with pytest.raises(ValueError, match=r"cp_comm='a2a' needs the context-parallel size \(%d\) to divide" % cp_size()):
        WanModel(three_heads, cp_comm="a2a")
    with pytest.raises(ValueError, match="cp_comm must be one of"):
        WanModel(PRESETS["wan-tiny"], cp_comm="ulysses")
    # 3 tokens over 4 ranks: one rank would hold only padding
    with pytest.raises(ValueError, match="context-parallel size 4 is too large for 3 tokens"):
        WanModel(PRESETS["wan-tiny"])(*inputs(1, 1, 2, 6))


def _cases():
    """The single-process diffusers references, computed once in the test process."""
    from megatron_rcm.models.cosmos import PRESETS as COSMOS
    from megatron_rcm.models.wan import PRESETS as WAN

    shape = (2, 3, 6, 6)  # 27 tokens: padding at CP 2 and 4
    wan_three_heads = dataclasses.replace(WAN["wan-tiny"], num_attention_heads=3)
    cosmos_three_heads = dataclasses.replace(COSMOS["cosmos-tiny"], num_attention_heads=3)
    cosmos_v2w = dataclasses.replace(COSMOS["cosmos-tiny-tp"], in_channels=5, extra_pos_embed_type="learnable")
    cases = {
        "wan": _wan_case("wan-tiny", shape),
        "wan-tp": _wan_case("wan-tiny-tp", shape),
        "wan-3heads": _wan_case(wan_three_heads, shape),
        "cosmos": _cosmos_case(COSMOS["cosmos-tiny"], shape),
        "cosmos-tp": _cosmos_case(COSMOS["cosmos-tiny-tp"], shape),
        "cosmos-3heads": _cosmos_case(cosmos_three_heads, shape),
        "cosmos-v2w": _cosmos_case(cosmos_v2w, shape, video2world=True),
    }
    return cases


def _check_all(cases):
    from megatron_rcm.models.wan import PRESETS as WAN
    from megatron_rcm.parallel import initialize_parallel

    plan = [
        # (TP, CP, [(case, cp_comm, sequence parallel)])
        (1, 2, [("wan", "a2a", False), ("wan", "ring", False), ("wan-3heads", "auto", False),
                ("cosmos", "a2a", False), ("cosmos", "ring", False), ("cosmos-3heads", "ring", False),
                ("cosmos-v2w", "auto", False)]),
        (1, 4, [("wan-tp", "a2a", False), ("wan-tp", "ring", False), ("wan", "auto", False),
                ("cosmos-tp", "a2a", False), ("cosmos-3heads", "ring", False)]),
        (2, 2, [("wan-tp", "a2a", True), ("wan-tp", "ring", False), ("cosmos-tp", "a2a", False),
                ("cosmos-tp", "ring", True), ("cosmos-v2w", "ring", True)]),
    ]
    for tp, cp, checks in plan:
        initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        for name, comm, sp in checks:
            _check(cases[name], comm, sp, f"TP={tp} CP={cp} {name} {comm} sp={sp}")
        _check_layout_helpers(cases["wan"])
        if cp == 4:
            _bad_inputs()
        elif tp == 1:
            three = dataclasses.replace(WAN["wan-tiny"], num_attention_heads=3)
            from megatron_rcm.models.wan import WanModel

            assert WanModel(three).token_layout((1, 4, 3, 6, 6)).split.comm == "ring"  # auto: 3 heads over CP 2
            assert WanModel(WAN["wan-tiny"]).token_layout((1, 4, 3, 6, 6)).split.comm == "a2a"


def test_context_parallel_matches_diffusers():
    run_on_ranks(_check_all, 4, _cases())
