"""Wan DiT on CUDA in bf16 (fused regions compiled, Triton JVP kernel) against float64 references.

Tolerance: our bf16 error against the float64 result must stay within 1.5x of the error that diffusers' own
model makes in bf16 (forward), or that torch.func.jvp over diffusers' model makes in bf16 on the math SDPA
backend (JVP) — the same precision budget as the peer implementation."""

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit", "models"))

pytestmark = pytest.mark.gpu


def _setup():
    from wan_float64_reference import float64_diffusers
    from wan_reference import megatron_state_dict

    from megatron_rcm.checkpoint.sharding import load_full_state_dict
    from megatron_rcm.models.wan import PRESETS, WanModel
    from diffusers import WanTransformer3DModel

    cfg = dataclasses.replace(PRESETS["wan2.1-t2v-1.3b"], num_layers=2, num_attention_heads=4, ffn_dim=1024,
                              text_dim=256)
    torch.manual_seed(0)
    with float64_diffusers():
        ref64 = WanTransformer3DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
        with torch.no_grad():
            for p in ref64.parameters():
                p.add_(0.02 * torch.randn_like(p))
        ref64 = ref64.double().cuda()
        ref64.rope.__init__(cfg.attention_head_dim, cfg.patch_size, 1024)
        ref64.rope.cuda()
    sd = megatron_state_dict(ref64)
    ours = WanModel(cfg, params_dtype=torch.bfloat16, perform_initialization=False).cuda()
    load_full_state_dict(ours, sd)
    ref16 = WanTransformer3DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    ref16.load_state_dict({k: v.float() for k, v in ref64.state_dict().items()})
    ref16 = ref16.to(torch.bfloat16).cuda()
    return cfg, ref64, ref16, ours


def _err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_forward_and_jvp_bf16_within_peer_error():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from wan_float64_reference import float64_diffusers, reference_jvp

    cfg, ref64, ref16, ours = _setup()
    g = torch.Generator(device="cuda").manual_seed(1)
    # 5 x 30 x 26 latent -> 975 tokens: not a multiple of any block size
    x = torch.randn(2, 16, 5, 30, 26, device="cuda", generator=g, dtype=torch.float64)
    t = torch.tensor([250.0, 800.0], device="cuda", dtype=torch.float64)
    text = torch.randn(2, 77, cfg.text_dim, device="cuda", generator=g, dtype=torch.float64)
    tx = torch.randn(x.shape, device="cuda", generator=g, dtype=torch.float64)
    tt = torch.tensor([30.0, -50.0], device="cuda", dtype=torch.float64)
    with float64_diffusers(), torch.no_grad():
        out64, tan64 = reference_jvp(ref64, x, t, text, tx, tt)
    bf = torch.bfloat16
    with torch.no_grad():
        peer_out = ref16(x.to(bf), t.float(), text.to(bf), return_dict=False)[0]
        ours_out = ours(x.to(bf), t.float(), text.to(bf))
    with sdpa_kernel(SDPBackend.MATH):
        _, peer_tan = torch.func.jvp(lambda a, b: ref16(a, b, text.to(bf), return_dict=False)[0],
                                     (x.to(bf), t.float()), (tx.to(bf), tt.float()))
    ours_out_j, ours_tan = ours.jvp(x.to(bf), t.float(), text.to(bf), tx.to(bf), tt.float())
    assert torch.isfinite(ours_tan).all()
    e_peer, e_ours = _err(peer_out, out64), _err(ours_out, out64)
    te_peer, te_ours = _err(peer_tan, tan64), _err(ours_tan, tan64)
    print(f"forward err ours {e_ours:.2e} peer {e_peer:.2e}; tangent err ours {te_ours:.2e} peer {te_peer:.2e}")
    assert e_ours <= 1.5 * e_peer
    assert _err(ours_out_j, out64) <= 1.5 * e_peer
    assert te_ours <= 1.5 * te_peer


def test_tensor_parallel_nccl_matches_single_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from wan_gpu_workers import check_tp_nccl

    from megatron_rcm.parallel import run_on_ranks

    run_on_ranks(check_tp_nccl, 2, cuda=True)


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_regions_give_eager_gradients_at_long_sequences(batch, monkeypatch):
    # The fused regions are compiled on CUDA; inductor's mix-order reduction returned wrong (or wrongly shaped)
    # gradients for adaLN modulations at a local batch of 1 and >= ~16k tokens (pytorch#193061, #178080). The
    # with-grad pass through compiled regions must give the gradients of the eager regions.
    from megatron_rcm.models.wan import PRESETS, WanModel
    from megatron_rcm.parallel import state

    state.ensure_parallel()
    cfg = dataclasses.replace(PRESETS["wan-tiny"], num_attention_heads=2, attention_head_dim=64, ffn_dim=256,
                              num_layers=2)
    torch.manual_seed(0)
    model = WanModel(cfg, params_dtype=torch.float32).cuda()
    x = torch.randn(batch, cfg.in_channels, 9, 64, 64, device="cuda")  # 9 x 32 x 32 = 9216 tokens per sample
    x = torch.cat([x, x.flip(-1)], dim=2)  # 18 frames: 18,432 tokens per sample
    t = torch.rand(batch, device="cuda") * 1000
    text = torch.randn(batch, 7, cfg.text_dim, device="cuda")

    def grads(fusion):
        monkeypatch.setenv("RCM_FUSION", fusion)
        model.zero_grad(set_to_none=True)
        model(x, t, text).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager, compiled = grads("0"), grads("1")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    worst = max(((compiled[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in eager.items())
    bad = [n for n, g in eager.items() if ((compiled[n] - g).norm() / g.norm().clamp_min(1e-30)).item() > 1e-4]
    assert not bad, f"compiled-region gradients differ from eager ones (worst {worst:.2e}): {bad[:8]}"
