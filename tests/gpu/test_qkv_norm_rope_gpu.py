"""The fused self-attention input kernel (bias, q/k RMSNorm across heads, RoPE, q/k/v split) against the
reference region of the blocks, on CUDA."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(1000, 1, 12, 128), (333, 2, 5, 64), (64, 3, 40, 128)],
                         ids=lambda s: "s{}b{}h{}d{}".format(*s))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("parts, with_rope", [(3, True), (1, False), (3, False)], ids=["qkv-rope", "q", "qkv"])
def test_kernel_matches_reference_region(shape, dtype, with_bias, parts, with_rope):
    from rcm_kernels.qkv_norm_rope import qkv_norm_rope, supported

    from megatron_rcm.models.blocks import _qk_norm_rope_local

    S, B, H, D = shape
    gen = torch.Generator(device="cuda").manual_seed(S * H + D + parts)
    y = torch.randn(S, B, H * parts * D, device="cuda", dtype=dtype, generator=gen) * 3
    bias = torch.randn(H * parts * D, device="cuda", dtype=dtype, generator=gen) if with_bias else None
    weights = tuple(torch.rand(H, D, device="cuda", generator=gen).to(dtype) + 0.5 for _ in range(min(parts, 2)))
    cos = sin = None
    if with_rope:
        ang = torch.rand(S, 1, 1, D // 2, device="cuda", generator=gen) * 100
        cos, sin = torch.cos(ang), torch.sin(ang)
    assert supported(y, cos, H, D, parts)
    y_before = y.clone()
    got = qkv_norm_rope(y, bias, weights, cos, sin, H, D, 1e-6, parts)
    assert torch.equal(y, y_before)
    ref = _qk_norm_rope_local.__wrapped__(y, None, bias, weights, cos, sin, False, False, 1e-6, H * D, H, parts, D,
                                          dtype)
    assert len(got) == len(ref) == parts
    for name, g, (r, _) in zip("qkv", got, ref):
        assert g.shape == r.shape == (S, B, H, D) and g.dtype == dtype
        assert torch.isfinite(g).all()
        # both compute in float32 (operation order aside) and round once: about one rounding step apart, measured
        # against each value's magnitude plus the tensor's mean magnitude (rotations cancel to values near 0)
        ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-19}[dtype]
        g, r = g.float(), r.float()
        bad = ((g - r).abs() > ulp * (r.abs() + r.abs().mean())).sum().item()
        assert bad == 0, f"{name}: {bad} values differ by more than a rounding step (max {(g - r).abs().max():.2e})"


def test_wan_forward_with_and_without_the_kernel(monkeypatch):
    import dataclasses

    from megatron_rcm.models.wan import PRESETS, WanModel
    from megatron_rcm.parallel import state

    state.ensure_parallel()
    cfg = dataclasses.replace(PRESETS["wan-tiny"], num_attention_heads=12, attention_head_dim=128, ffn_dim=512,
                              num_layers=2)
    torch.manual_seed(0)
    model = WanModel(cfg, params_dtype=torch.bfloat16).cuda()
    x = torch.randn(2, cfg.in_channels, 5, 32, 48, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([100.0, 900.0], device="cuda")
    text = torch.randn(2, 7, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    calls = []
    import rcm_kernels.qkv_norm_rope as kernel_module

    plain = kernel_module.qkv_norm_rope
    monkeypatch.setattr(kernel_module, "qkv_norm_rope", lambda *a: calls.append(1) or plain(*a))
    monkeypatch.setenv("RCM_QKV_KERNEL", "1")
    with torch.no_grad():
        got = model(x, t, text).float()
        # self-attention q/k/v and cross-attention q in every block
        assert len(calls) == 2 * cfg.num_layers, "the plain forward must take the kernel in every block"
        monkeypatch.setenv("RCM_QKV_KERNEL", "0")
        ref = model(x, t, text).float()
    assert len(calls) == 2 * cfg.num_layers
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-2
