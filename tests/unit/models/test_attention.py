"""Attention math path: JVP oracle against torch.func.jvp, the split-K/V merge, plain attention vs SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_rcm.models.attention import (
    attention,
    attention_block_backward,
    attention_jvp,
    attention_with_lse,
    math_attention,
    math_attention_jvp,
    merge_attention_pair,
    merge_attention_partials,
)


def _bhsd(gen, b, h, s, d, dtype=torch.float64, permuted=True):
    # The DiT passes permuted views of [S, B, H, D] activations: test those strides too.
    if permuted:
        return torch.randn(s, b, h, d, generator=gen, dtype=dtype).permute(1, 2, 0, 3)
    return torch.randn(b, h, s, d, generator=gen, dtype=dtype)


def _func_jvp_reference(q, k, v, tq, tk, tv, scale):
    """Forward-mode AD of the textbook formulas, independent of the explicit rules under test."""
    tk = torch.zeros_like(k) if tk is None else tk
    tv = torch.zeros_like(v) if tv is None else tv

    def attn(q, k, v):
        return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1) @ v

    def lse(q, k):
        return torch.logsumexp(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)

    o, to = torch.func.jvp(attn, (q, k, v), (tq, tk, tv))
    l, mu = torch.func.jvp(lse, (q, k), (tq, tk))
    return o, to, l, mu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "b,h,sq,sk,d,with_kv_tangent",
    [
        (2, 3, 7, 7, 8, True),  # self-attention
        (1, 2, 5, 11, 16, True),  # Sq != Sk
        (2, 2, 9, 4, 8, False),  # cross-attention: zero key/value tangents
        (1, 1, 6, 13, 4, False),
    ],
)
def test_math_jvp_matches_func_jvp_float64(b, h, sq, sk, d, with_kv_tangent):
    gen = torch.Generator().manual_seed(1000 * sq + sk)
    q, tq = _bhsd(gen, b, h, sq, d), _bhsd(gen, b, h, sq, d)
    k, v = _bhsd(gen, b, h, sk, d), _bhsd(gen, b, h, sk, d)
    tk = _bhsd(gen, b, h, sk, d) if with_kv_tangent else None
    tv = _bhsd(gen, b, h, sk, d) if with_kv_tangent else None
    scale = 0.7 / math.sqrt(d)

    got = math_attention_jvp(q, k, v, tq, tk, tv, scale=scale)
    want = _func_jvp_reference(q, k, v, tq, tk, tv, scale)
    for name, g, w in zip(("o", "to", "lse", "mu"), got, want):
        assert g.dtype == torch.float64, name
        assert g.shape == w.shape, name
        assert _rel(g, w) < 1e-12, (name, _rel(g, w))


def test_default_scale_is_inverse_sqrt_head_dim():
    gen = torch.Generator().manual_seed(3)
    q, tq, k, v, tk, tv = (_bhsd(gen, 1, 2, 5, 16) for _ in range(6))
    got = math_attention_jvp(q, k, v, tq, tk, tv)
    want = _func_jvp_reference(q, k, v, tq, tk, tv, 0.25)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-12


def test_zero_kv_tangent_equals_explicit_zeros():
    gen = torch.Generator().manual_seed(4)
    q, tq = _bhsd(gen, 1, 2, 6, 8), _bhsd(gen, 1, 2, 6, 8)
    k, v = _bhsd(gen, 1, 2, 9, 8), _bhsd(gen, 1, 2, 9, 8)
    none = math_attention_jvp(q, k, v, tq, None, None)
    zeros = math_attention_jvp(q, k, v, tq, torch.zeros_like(k), torch.zeros_like(v))
    for a, b in zip(none, zeros):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_jvp_agrees_with_central_difference():
    # An independent check of the tangent itself, not only of the AD bookkeeping.
    gen = torch.Generator().manual_seed(5)
    q, tq = _bhsd(gen, 1, 2, 5, 8), _bhsd(gen, 1, 2, 5, 8)
    k, tk = _bhsd(gen, 1, 2, 7, 8), _bhsd(gen, 1, 2, 7, 8)
    v, tv = _bhsd(gen, 1, 2, 7, 8), _bhsd(gen, 1, 2, 7, 8)
    o, to, lse, mu = math_attention_jvp(q, k, v, tq, tk, tv)
    eps = 1e-6
    plus = math_attention_jvp(q + eps * tq, k + eps * tk, v + eps * tv, tq, tk, tv)
    minus = math_attention_jvp(q - eps * tq, k - eps * tk, v - eps * tv, tq, tk, tv)
    assert _rel((plus[0] - minus[0]) / (2 * eps), to) < 1e-8
    assert _rel((plus[2] - minus[2]) / (2 * eps), mu) < 1e-8


@pytest.mark.parametrize("with_kv_tangent", [True, False])
def test_merge_of_split_kv_reproduces_full_attention(with_kv_tangent):
    gen = torch.Generator().manual_seed(6)
    b, h, sq, sk, d = 2, 3, 6, 11, 8
    q, tq = _bhsd(gen, b, h, sq, d), _bhsd(gen, b, h, sq, d)
    k, v = _bhsd(gen, b, h, sk, d), _bhsd(gen, b, h, sk, d)
    # Make the two halves' log-sum-exps differ a lot, so the weights matter.
    k[:, :, :4] *= 3.0
    tk = _bhsd(gen, b, h, sk, d) if with_kv_tangent else None
    tv = _bhsd(gen, b, h, sk, d) if with_kv_tangent else None
    full = math_attention_jvp(q, k, v, tq, tk, tv)

    def part(lo, hi):
        sl = slice(lo, hi)
        return math_attention_jvp(
            q, k[:, :, sl], v[:, :, sl], tq,
            None if tk is None else tk[:, :, sl], None if tv is None else tv[:, :, sl],
        )

    merged = merge_attention_partials([part(0, 4), part(4, sk)])
    for name, m, f in zip(("o", "to", "lse", "mu"), merged, full):
        assert _rel(m, f) < 1e-13, (name, _rel(m, f))
    # Three-way split, in a different order: the merge is order-free.
    merged3 = merge_attention_partials([part(7, sk), part(0, 3), part(3, 7)])
    for name, m, f in zip(("o", "to", "lse", "mu"), merged3, full):
        assert _rel(m, f) < 1e-13, (name, _rel(m, f))


@pytest.mark.parametrize("tangents", [True, False], ids=["jvp", "plain"])
def test_pairwise_merge_of_ring_steps_reproduces_full_attention(tangents):
    """The ring merges one block at a time (`merge_attention_pair`); plain parts carry (o, lse) only."""
    gen = torch.Generator().manual_seed(16)
    b, h, sq, sk, d = 1, 2, 5, 12, 8
    q, tq = _bhsd(gen, b, h, sq, d), _bhsd(gen, b, h, sq, d)
    k, v, tk, tv = (_bhsd(gen, b, h, sk, d) for _ in range(4))
    k[:, :, 4:8] *= 3.0
    full = math_attention_jvp(q, k, v, tq, tk, tv)
    running = None
    for lo, hi in ((4, 8), (0, 4), (8, 12)):
        sl = slice(lo, hi)
        if tangents:
            part = math_attention_jvp(q, k[:, :, sl], v[:, :, sl], tq, tk[:, :, sl], tv[:, :, sl])
        else:
            o, lse = attention_with_lse(q, k[:, :, sl], v[:, :, sl])
            part = (o, None, lse, None)
        running = part if running is None else merge_attention_pair(running, part)
    names = ("o", "to", "lse", "mu") if tangents else ("o", None, "lse", None)
    for name, m, f in zip(names, running, full):
        if name is not None:
            assert _rel(m, f) < 1e-13, (name, _rel(m, f))
    if not tangents:
        assert running[1] is None and running[3] is None


def test_block_backwards_against_merged_statistics_sum_to_the_full_gradient():
    """Ring backward rule: per K/V block, the attention backward with the merged o and LSE; dq summed over the
    blocks, dk/dv per block, equal autograd through the full attention (float64)."""
    gen = torch.Generator().manual_seed(17)
    b, h, sq, sk, d = 2, 2, 6, 10, 8
    q = _bhsd(gen, b, h, sq, d).requires_grad_()
    k = _bhsd(gen, b, h, sk, d).requires_grad_()
    v = _bhsd(gen, b, h, sk, d).requires_grad_()
    do = _bhsd(gen, b, h, sq, d)
    math_attention(q, k, v).backward(do)
    with torch.no_grad():
        o, lse = attention_with_lse(q, k, v)
        assert _rel(o, math_attention(q, k, v)) < 1e-14
        assert _rel(lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)) < 1e-14
        dq = torch.zeros_like(q)
        for lo, hi in ((0, 3), (3, 10)):
            dq_b, dk_b, dv_b = attention_block_backward(do, q, k[:, :, lo:hi], v[:, :, lo:hi], o, lse)
            dq += dq_b
            assert _rel(dk_b, k.grad[:, :, lo:hi]) < 1e-12
            assert _rel(dv_b, v.grad[:, :, lo:hi]) < 1e-12
        assert _rel(dq, q.grad) < 1e-12


def test_merge_ignores_empty_parts():
    gen = torch.Generator().manual_seed(7)
    q, tq, k, v = (_bhsd(gen, 1, 1, 4, 8) for _ in range(4))
    full = math_attention_jvp(q, k, v, tq)
    nan = torch.full_like(full[0], float("nan"))
    empty = (nan, nan, torch.full_like(full[2], float("-inf")), torch.full_like(full[3], float("nan")))
    merged = merge_attention_partials([full, empty])
    for m, f in zip(merged, full):
        assert _rel(m, f) < 1e-14


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 12)])
def test_attention_equals_sdpa_math_on_cpu(dtype, tol, sq, sk):
    gen = torch.Generator().manual_seed(8 + sq)
    q = _bhsd(gen, 2, 3, sq, 16, dtype)
    k, v = _bhsd(gen, 2, 3, sk, 16, dtype), _bhsd(gen, 2, 3, sk, 16, dtype)
    with sdpa_kernel([SDPBackend.MATH]):
        want = F.scaled_dot_product_attention(q, k, v)
        want_scaled = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    got = attention(q, k, v)
    assert got.dtype == dtype and got.shape == want.shape
    assert _rel(got, want) < tol
    assert _rel(attention(q, k, v, scale=0.3), want_scaled) < tol


def test_attention_half_precision_on_cpu_keeps_dtype():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (_bhsd(gen, 1, 2, 6, 8, torch.float64) for _ in range(3))
    ref = attention(q, k, v)
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16
    assert _rel(got, ref) < 2e-2


def test_attention_jvp_cpu_dispatch_and_dtypes():
    gen = torch.Generator().manual_seed(10)
    q, tq, k, v = (_bhsd(gen, 1, 2, 6, 8, torch.float64) for _ in range(4))
    want = _func_jvp_reference(q, k, v, tq, None, None, 1 / math.sqrt(8))
    got = attention_jvp(q, k, v, tq)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-12
    half = attention_jvp(q.bfloat16(), k.bfloat16(), v.bfloat16(), tq.bfloat16())
    assert [x.dtype for x in half] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for g, w in zip(half, want):
        assert _rel(g, w) < 3e-2


_INTERPRETER_CHECK = r"""
import torch
from rcm_kernels import flash_attention_jvp, parse_config
from megatron_rcm.models.attention import math_attention_jvp

torch.manual_seed(0)
worst = {}
cases = [
    # b, h, sq, sk, d, kv tangent, scale, config (block_m, block_n, warps, stages, skip_rescale, precise)
    (1, 2, 37, 53, 32, True, 0.3, "16,16,4,1,1,1"),
    (2, 1, 40, 32, 24, False, 0.2, "32,16,4,1,1,1"),
    (1, 1, 20, 70, 16, True, 1.5, "16,32,4,1,0,0"),
    (1, 1, 5, 129, 16, True, 0.8, "16,16,4,1,1,0"),
]
for dtype in (torch.float32, torch.float16):
    for b, h, sq, sk, d, kv, scale, cfg in cases:
        cfg = parse_config(cfg)
        # float32 outputs show the kernel's own error, without the final rounding to fp16.
        out_dtype = torch.float32
        mk = lambda s: torch.randn(s, b, h, d).to(dtype).permute(1, 2, 0, 3)
        q, tq, k, v, tk, tv = mk(sq), mk(sq), mk(sk), mk(sk), mk(sk), mk(sk)
        k[:, :, sk // 2:] *= 2  # the running max moves mid-sequence
        if not kv:
            tk = tv = None
        nan = float("nan")
        out = (torch.full((b, h, sq, d), nan, dtype=out_dtype), torch.full((b, h, sq, d), nan, dtype=out_dtype),
               torch.full((b, h, sq), nan), torch.full((b, h, sq), nan))
        got = flash_attention_jvp(q, k, v, tq, tk, tv, scale=scale, out=out, config=cfg)
        up = lambda x: None if x is None else x.double()
        ref = math_attention_jvp(up(q), up(k), up(v), up(tq), up(tk), up(tv), scale=scale)
        key = str(dtype).split(".")[1] + ("-precise" if cfg.precise else "-fast")
        for g, r in zip(got, ref):
            assert torch.isfinite(g).all()
            worst[key] = max(worst.get(key, 0.0), ((g.double() - r).norm() / r.norm()).item())
print("WORST", " ".join(f"{k}={v:.3e}" for k, v in sorted(worst.items())))
"""


def test_triton_kernel_in_interpreter_mode():
    """The Triton kernel's logic on CPU (Triton's interpreter; fp32 and fp16 — it mishandles bf16)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line = [x for x in run.stdout.splitlines() if x.startswith("WORST")][-1]
    worst = dict((kv.split("=")[0], float(kv.split("=")[1])) for kv in line.split()[1:])
    assert set(worst) == {"float32-precise", "float32-fast", "float16-precise", "float16-fast"}, worst
    assert worst["float32-precise"] < 5e-6 and worst["float32-fast"] < 5e-6, worst
    # fp16 probabilities split in two 16-bit parts: fp32-level error; rounded once: fp16-level error.
    assert worst["float16-precise"] < 5e-6, worst
    assert 1e-5 < worst["float16-fast"] < 3e-3, worst
