"""Triton FlashAttention-2 JVP kernel against a float64 reference, on CUDA.

Acceptance rule: for each of ``o, to, lse, mu`` the kernel's relative error against float64 math is at
most 1.2x the error of the obvious alternative in the same dtype — ``torch.func.jvp`` over the math
SDPA backend for ``o, to``, and over ``logsumexp(q k^T * scale)`` for ``lse, mu``.
"""

import dataclasses
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytestmark = pytest.mark.gpu

RATIO = 1.2


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(seed, b, h, sq, sk, d, dtype, kv_tangent, layout="sbhd"):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def make(s):
        if layout == "sbhd":  # permuted views of [S, B, H, D], as the DiT passes them
            return torch.randn(s, b, h, d, generator=gen, device="cuda", dtype=dtype).permute(1, 2, 0, 3)
        return torch.randn(b, h, s, d, generator=gen, device="cuda", dtype=dtype)

    q, tq = make(sq), make(sq)
    k, v = make(sk), make(sk)
    tk, tv = (make(sk), make(sk)) if kv_tangent else (None, None)
    return q, k, v, tq, tk, tv


def _float64_reference(q, k, v, tq, tk, tv, scale):
    from megatron_rcm.models.attention import math_attention_jvp

    up = lambda x: None if x is None else x.double()  # noqa: E731
    return math_attention_jvp(up(q), up(k), up(v), up(tq), up(tk), up(tv), scale=scale)


def _same_dtype_baseline(q, k, v, tq, tk, tv, scale):
    """torch.func.jvp over math SDPA (o, to) and over logsumexp (lse, mu), all in the input dtype."""
    tk = torch.zeros_like(k) if tk is None else tk
    tv = torch.zeros_like(v) if tv is None else tv

    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def lse(q, k):
        return torch.logsumexp(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)

    o, to = torch.func.jvp(sdpa, (q, k, v), (tq, tk, tv))
    l, mu = torch.func.jvp(lse, (q, k), (tq, tk))
    return o, to, l, mu


def _poisoned_out(q):
    b, h, sq, d = q.shape
    nan = float("nan")
    return (
        torch.full((b, h, sq, d), nan, device="cuda", dtype=q.dtype),
        torch.full((b, h, sq, d), nan, device="cuda", dtype=q.dtype),
        torch.full((b, h, sq), nan, device="cuda", dtype=torch.float32),
        torch.full((b, h, sq), nan, device="cuda", dtype=torch.float32),
    )


def _check_against_baseline(got, ref, base, label):
    names = ("o", "to", "lse", "mu")
    report = []
    for name, g, r, bl in zip(names, got, ref, base):
        assert torch.isfinite(g).all(), f"{label}: {name} has unwritten (NaN) or non-finite entries"
        e_kernel, e_base = _rel(g, r), _rel(bl, r)
        report.append(f"{name} {e_kernel:.3e}/{e_base:.3e}={e_kernel / e_base:.2f}")
    print(label, " ".join(report))
    for name, g, r, bl in zip(names, got, ref, base):
        e_kernel, e_base = _rel(g, r), _rel(bl, r)
        assert e_kernel <= RATIO * e_base, f"{label}: {name} error {e_kernel:.3e} > {RATIO} x {e_base:.3e}"


CASES = [
    # b, h, sq, sk, d, kv_tangent
    (2, 3, 1000, 1000, 128, True),  # self-attention, lengths not multiples of any block size
    (1, 4, 777, 1531, 128, True),  # Sq != Sk
    (2, 2, 1537, 512, 128, False),  # cross-attention to 512 text tokens: tk = tv = 0
    (1, 3, 901, 77, 128, False),  # short ragged text
    (2, 3, 1000, 1000, 64, True),
    (1, 2, 515, 333, 64, False),
    (1, 2, 300, 301, 96, True),  # head dim that is not a power of two (padded block)
    (1, 1, 5, 4099, 128, True),  # fewer queries than one block
]


@pytest.mark.parametrize("warp_specialized", [True, False], ids=["default", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}q{}k{}d{}{}".format(*c[:5], "" if c[5] else "-notkv"))
def test_kernel_error_within_baseline(case, dtype, warp_specialized):
    # "default" runs the warp-specialised Hopper kernel where it applies (bf16, head dims 64/128 on sm_90),
    # "portable" the Triton kernel everywhere.
    from rcm_kernels import default_config, flash_attention_jvp

    b, h, sq, sk, d, kv_tangent = case
    scale = 1.0 / math.sqrt(d)
    config = dataclasses.replace(default_config(d, sq, sk, b * h, kv_tangent, dtype), warp_specialized=warp_specialized)
    for repeat in range(2):  # fresh random inputs on every check
        seed = zlib.crc32(repr((case, str(dtype), repeat)).encode())
        q, k, v, tq, tk, tv = _inputs(seed, b, h, sq, sk, d, dtype, kv_tangent)
        out = _poisoned_out(q)
        got = flash_attention_jvp(q, k, v, tq, tk, tv, scale=scale, out=out, config=config)
        assert all(g is o for g, o in zip(got, out))
        ref = _float64_reference(q, k, v, tq, tk, tv, scale)
        base = _same_dtype_baseline(q, k, v, tq, tk, tv, scale)
        _check_against_baseline(got, ref, base, f"{case} {dtype} #{repeat}")


def test_mixed_strides_and_explicit_scale():
    # Tangents in a different memory layout from their primals, and a non-default scale.
    from rcm_kernels import flash_attention_jvp

    q, k, v, _, _, _ = _inputs(11, 2, 3, 700, 650, 128, torch.bfloat16, False, layout="sbhd")
    _, _, _, tq, tk, tv = _inputs(12, 2, 3, 700, 650, 128, torch.bfloat16, True, layout="bhsd")
    scale = 0.05
    got = flash_attention_jvp(q, k, v, tq, tk, tv, scale=scale, out=_poisoned_out(q))
    ref = _float64_reference(q, k, v, tq, tk, tv, scale)
    base = _same_dtype_baseline(q, k, v, tq, tk, tv, scale)
    _check_against_baseline(got, ref, base, "mixed strides")


def test_attention_jvp_dispatches_to_kernel():
    from megatron_rcm.models.attention import attention_jvp

    q, k, v, tq, tk, tv = _inputs(13, 1, 2, 300, 200, 128, torch.bfloat16, True)
    got = attention_jvp(q, k, v, tq, tk, tv)
    assert [x.dtype for x in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    ref = _float64_reference(q, k, v, tq, tk, tv, 1 / math.sqrt(128))
    base = _same_dtype_baseline(q, k, v, tq, tk, tv, 1 / math.sqrt(128))
    _check_against_baseline(got, ref, base, "attention_jvp")


@pytest.mark.parametrize("kv_tangent", [True, False])
def test_split_kv_merge_on_gpu(kv_tangent):
    """Ring-CP building block: kernel on two K/V halves + merge == full attention."""
    from megatron_rcm.models.attention import merge_attention_partials
    from rcm_kernels import flash_attention_jvp

    b, h, sq, sk, d = 1, 4, 1100, 1900, 128
    scale = 1.0 / math.sqrt(d)
    q, k, v, tq, tk, tv = _inputs(14 + kv_tangent, b, h, sq, sk, d, torch.bfloat16, kv_tangent)
    cut = 777  # not a multiple of any block size

    def part(sl):
        # float32 partials, as a ring step keeps them: one rounding at the end, not one per part.
        out = tuple(x.float() for x in _poisoned_out(q))
        return flash_attention_jvp(
            q, k[:, :, sl], v[:, :, sl], tq,
            None if tk is None else tk[:, :, sl], None if tv is None else tv[:, :, sl],
            scale=scale, out=out,
        )

    merged = merge_attention_partials([part(slice(0, cut)), part(slice(cut, sk))])
    assert merged[0].dtype == torch.float32
    merged = (merged[0].bfloat16(), merged[1].bfloat16(), merged[2], merged[3])
    full = flash_attention_jvp(q, k, v, tq, tk, tv, scale=scale)
    ref = _float64_reference(q, k, v, tq, tk, tv, scale)
    base = _same_dtype_baseline(q, k, v, tq, tk, tv, scale)
    for name, m, f, r, bl in zip(("o", "to", "lse", "mu"), merged, full, ref, base):
        assert torch.isfinite(m).all(), name
        e_merged, e_full, e_base = _rel(m, r), _rel(f, r), _rel(bl, r)
        print(f"merge {name}: merged {e_merged:.3e} full {e_full:.3e} baseline {e_base:.3e}")
        assert e_merged <= RATIO * e_base, (name, e_merged, e_base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fast_mode_error(dtype):
    """precise=False rounds the probabilities to the input dtype: about 1.4x the fp32-math error."""
    from rcm_kernels import default_config, flash_attention_jvp
    import dataclasses

    q, k, v, tq, tk, tv = _inputs(16, 2, 3, 1000, 1000, 128, dtype, True)
    cfg = dataclasses.replace(default_config(128, 1000, 1000, 6, True, dtype), precise=False)
    got = flash_attention_jvp(q, k, v, tq, tk, tv, out=_poisoned_out(q), config=cfg)
    ref = _float64_reference(q, k, v, tq, tk, tv, 128 ** -0.5)
    base = _same_dtype_baseline(q, k, v, tq, tk, tv, 128 ** -0.5)
    for name, g, r, bl in zip(("o", "to", "lse", "mu"), got, ref, base):
        assert torch.isfinite(g).all(), name
        print(f"fast {dtype} {name}: {_rel(g, r):.3e} vs baseline {_rel(bl, r):.3e}")
        assert _rel(g, r) <= 1.6 * _rel(bl, r), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_plain_attention_on_gpu(dtype):
    """Plain attention is a fused kernel that rounds probabilities to the input dtype (cuDNN or FA):
    compare it with PyTorch's own FLASH backend, not with math SDPA (which upcasts to fp32)."""
    from megatron_rcm.models.attention import attention, math_attention

    q, k, v, _, _, _ = _inputs(15, 2, 3, 1000, 777, 128, dtype, False)
    got = attention(q, k, v)
    assert got.dtype == dtype and got.shape == q.shape
    ref = math_attention(q.double(), k.double(), v.double())
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    with sdpa_kernel([SDPBackend.MATH]):
        math_sdpa = F.scaled_dot_product_attention(q, k, v)
    print(f"attention {dtype}: {_rel(got, ref):.3e} vs flash sdpa {_rel(flash, ref):.3e}, "
          f"math sdpa {_rel(math_sdpa, ref):.3e}")
    assert _rel(got, ref) <= RATIO * _rel(flash, ref)


def test_values_beyond_fp16_range():
    """bf16 values above fp16's range take the power-of-two scale path of the precise mode."""
    from rcm_kernels import flash_attention_jvp

    q, k, v, tq, tk, tv = _inputs(17, 1, 2, 600, 700, 128, torch.bfloat16, True)
    v, tv = v * 3e4, tv * 5e4  # max |v| ~ 1.5e5 > 65504
    got = flash_attention_jvp(q, k, v, tq, tk, tv, out=_poisoned_out(q))
    ref = _float64_reference(q, k, v, tq, tk, tv, 128 ** -0.5)
    base = _same_dtype_baseline(q, k, v, tq, tk, tv, 128 ** -0.5)
    _check_against_baseline(got, ref, base, "large values")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the warp-specialised kernel is for sm_90")
def test_hopper_kernel_applies_to_the_dit_layouts():
    """The DiT hands the kernel permuted [S, B, H, D] views (and [B, S, H, D] from other callers): both must
    take the fast kernel, and its result must be the one flash_attention_jvp returns."""
    from rcm_kernels import default_config, flash_attention_jvp
    from rcm_kernels.flash_attention_jvp_hopper import flash_attention_jvp_hopper, hopper_kernel_supports

    q, k, v, tq, tk, tv = _inputs(18, 2, 3, 700, 900, 128, torch.bfloat16, True)
    o = torch.empty_like(q)
    assert hopper_kernel_supports(q, k, v, tq, tk, tv, o, o)
    bshd = [x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for x in (q, k, v, tq, tk, tv)]
    assert hopper_kernel_supports(*bshd, o, o)
    assert not hopper_kernel_supports(q, k, v, tq, tk, None, o, o)  # one K/V tangent alone: portable kernel
    assert not hopper_kernel_supports(q[..., :96], k[..., :96], v[..., :96], tq[..., :96], None, None, o, o)

    cfg = dataclasses.replace(default_config(128, 700, 900, 6), precise=False)
    got = flash_attention_jvp(q, k, v, tq, tk, tv, config=cfg)
    out = _poisoned_out(q)
    direct = flash_attention_jvp_hopper(q, k, v, tq, tk, tv, *out, 128 ** -0.5, None)
    for g, d in zip(got, direct):
        torch.testing.assert_close(g, d, rtol=0, atol=0)
