"""The ring's per-block steps on CUDA in bf16 (SDPA FLASH forward with LSE and its backward against merged
statistics, our JVP kernel with float32 partials, the fused pairwise merge), run block by block over a split K/V
on one GPU as a ring rank does, against float64 math over the whole K/V.

Acceptance: relative errors within a small multiple of bf16 attention's own error against float64 (the same
inputs through SDPA's math backend in bf16)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(b=1, h=4, s=1536, d=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # permuted [S, B, H, D] views, as the DiT passes them
    return [torch.randn(s, b, h, d, generator=gen, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3)
            for _ in range(6)]


def _blocks(s, n):
    step = -(-s // n)
    return [slice(i, min(i + step, s)) for i in range(0, s, step)]


def _bf16_math_error(q, k, v, reference):
    with sdpa_kernel([SDPBackend.MATH]):
        return _rel(F.scaled_dot_product_attention(q, k, v), reference)


@pytest.mark.parametrize("n_blocks", [2, 4])
def test_plain_and_backward_block_steps_match_float64(n_blocks):
    from megatron_rcm.models.attention import attention_block_backward, attention_with_lse, merge_attention_pair

    q, k, v, do, _, _ = _inputs()
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64)
    ref.backward(do.double())
    running = None
    for sl in _blocks(k.shape[2], n_blocks):
        o, lse = attention_with_lse(q, k[:, :, sl], v[:, :, sl])
        part = (o.float(), None, lse, None)
        running = part if running is None else merge_attention_pair(running, part)
    o, lse = running[0], running[2]
    bound = 3 * max(_bf16_math_error(q, k, v, ref.detach()), 1e-3)
    assert _rel(o, ref.detach()) <= bound
    dq = torch.zeros_like(q, dtype=torch.float32)
    for sl in _blocks(k.shape[2], n_blocks):
        dq_b, dk_b, dv_b = attention_block_backward(do, q, k[:, :, sl], v[:, :, sl], o, lse)
        dq += dq_b
        assert _rel(dk_b, k64.grad[:, :, sl]) <= 5 * bound
        assert _rel(dv_b, v64.grad[:, :, sl]) <= 5 * bound
    assert _rel(dq, q64.grad) <= 5 * bound


@pytest.mark.parametrize("n_blocks", [2, 4])
def test_jvp_block_steps_match_float64(n_blocks):
    from megatron_rcm.models.attention import attention_jvp, math_attention_jvp, merge_attention_pair

    q, k, v, tq, tk, tv = _inputs(seed=1)
    ref = math_attention_jvp(*(x.double() for x in (q, k, v, tq, tk, tv)))
    running = None
    for sl in _blocks(k.shape[2], n_blocks):
        part = attention_jvp(q, k[:, :, sl], v[:, :, sl], tq, tk[:, :, sl], tv[:, :, sl], out_dtype=torch.float32)
        assert part[0].dtype == torch.float32
        running = part if running is None else merge_attention_pair(running, part)
    whole = attention_jvp(q, k, v, tq, tk, tv, out_dtype=torch.float32)  # one block: the kernel's own error
    for name, got, one, exp in zip(("o", "to", "lse", "mu"), running, whole, ref):
        assert _rel(got, exp) <= 1.5 * _rel(one, exp) + 1e-6, name
