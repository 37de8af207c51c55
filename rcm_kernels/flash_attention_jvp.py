"""FlashAttention-2 forward with a Jacobian-vector product, in Triton (the portable kernel).

On Hopper, :func:`flash_attention_jvp` hands supported inputs to the warp-specialised kernel of
:mod:`rcm_kernels.flash_attention_jvp_hopper`, which computes the same recurrences with the same tiles.

For ``o = softmax(scale * q k^T) v`` and tangents ``(q_tangent, k_tangent, v_tangent)`` the kernel returns

* ``o``  — the attention output,
* ``o_tangent`` — its directional derivative,
* ``lse`` — the row log-sum-exp of ``scale * q k^T`` (natural log, float32),
* ``mu`` — ``d lse``, the directional derivative of ``lse`` (float32).

Per query row, with ``s = scale q k^T``, ``P = softmax(s)`` and
``dS = scale (q_tangent k^T + q k_tangent^T)``::

    d lse = sum_j P_j dS_j = mu
    d o   = P v_tangent + (P * dS) v - mu o

Streaming over key/value blocks as FlashAttention-2 does, each program keeps in fp32 the running
max ``m``, the sum ``l = sum P~``, ``O~ = P~ v``, ``T~ = P~ v_tangent + (P~ * dS) v`` and
``r = rowsum(P~ * dS)``, all rescaled by ``exp(m_old - m_new)`` when the max moves. The epilogue divides by
``l``: ``o = O~ / l``, ``mu = r / l``, ``o_tangent = T~ / l - mu o``. ``P~ v_tangent`` and ``(P~ * dS) v`` share one
accumulator (they are only ever needed as a sum), which keeps two ``BLOCK_M x D`` fp32 tiles in
registers instead of three.

Cost per tile: ``q k^T``, ``q_tangent k^T``, ``q k_tangent^T``, ``P v``, ``P v_tangent``, ``(P*dS) v`` — six GEMMs,
three times the forward's FLOPs. With ``k_tangent = v_tangent = 0`` (cross-attention to text, whose keys/values
carry no tangent) the ``q k_tangent^T`` and ``P v_tangent`` GEMMs are skipped.

``lse`` and ``mu`` let partial results over disjoint key/value blocks be merged exactly (ring context
parallelism); see ``megatron_rcm.models.attention.merge_attention_partials``.

Precision: scores and their tangents come from the input dtype with fp32 accumulation; the three GEMMs
after the softmax take 16-bit probabilities. By default (``JVPKernelConfig.precise``) those carry more
bits than the input dtype (fp16 operands for bf16 inputs, a two-part split for fp16 inputs), so the
error stays at that of fp32 math followed by one rounding of the output (benchmarks/RESULTS.md, "Attention
JVP kernel", the accuracy table).

Sequence lengths are run-time arguments (not compile-time constants), and the block configuration is
picked by a rule rather than autotuned, so a new shape costs no recompilation and no tuning.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

__all__ = ["JVPKernelConfig", "flash_attention_jvp", "default_config", "parse_config"]

@dataclass(frozen=True)
class JVPKernelConfig:
    """Launch configuration of the JVP kernel."""

    block_m: int = 128
    """Query rows per program."""

    block_n: int = 64
    """Key/value rows per inner-loop step."""

    num_warps: int = 8
    """Warps per program (8 = two warpgroups on Hopper, 64 query rows each at block_m=128)."""

    num_stages: int = 2
    """Software-pipelining depth of the key/value loads."""

    skip_rescale: bool = True
    """Skip rescaling the two accumulator tiles in blocks where no row's running max moved."""

    precise: bool = True
    """Hold the error to that of fp32 math plus one rounding of the output. The GEMMs after the softmax
    take the probabilities as 16-bit operands; rounded to the input dtype they would add about as much
    error again as the output rounding. So: bf16 inputs run those GEMMs on fp16 operands (``v`` and
    ``v_tangent`` converted once, before the kernel, with a power-of-two scale that keeps them in range); fp16
    inputs split the probabilities into a high and a low fp16 part (three more GEMMs). ``False``: the
    probabilities are rounded to the input dtype (faster, with a larger error: benchmarks/RESULTS.md,
    "Attention JVP kernel", the accuracy table)."""

    warp_specialized: bool = True
    """On Hopper (sm_90), for head dims 64 and 128 with TMA-compatible strides, run the warp-specialised
    kernel of :mod:`rcm_kernels.flash_attention_jvp_hopper` (a TMA producer warp and two consumer
    warpgroups, 128 query rows and 64 keys per step) instead of this module's kernel; the block sizes,
    ``num_warps`` and ``num_stages`` above then do not apply. fp16 inputs with ``precise`` always use
    this module's kernel (the split probabilities)."""


def default_config(
    head_dim: int,
    seq_q: int,
    seq_k: int,
    batch_heads: int,
    has_kv_tangent: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> JVPKernelConfig:
    """The launch configuration used when none is given.

    A rule instead of an autotuner: autotuning every (Sq, Sk) pair a DiT meets would add a long first call per
    shape (the autotuned reference kernel's first calls in benchmarks/RESULTS.md). Chosen by compiling for
    sm_90 (registers, spills, shared memory) and timing a handful of configurations on an H100
    (benchmarks/RESULTS.md): 128 query rows over two warpgroups, 64 keys per step.

    ``RCM_JVP_KERNEL_CONFIG`` (:func:`parse_config` syntax) replaces the rule, warp specialisation included;
    without it, ``RCM_JVP_WARP_SPECIALIZED=0`` keeps the portable kernel on Hopper too. The training config's
    ``kernels.jvp_kernel_config`` and ``kernels.jvp_warp_specialized`` set these variables, and a variable set
    in the environment overrides the config.
    """
    override = os.environ.get("RCM_JVP_KERNEL_CONFIG")
    if override:
        return parse_config(override)
    config = _rule_config(head_dim, seq_q, batch_heads, has_kv_tangent, dtype)
    if os.environ.get("RCM_JVP_WARP_SPECIALIZED", "1") == "0":
        config = replace(config, warp_specialized=False)
    return config


def _rule_config(head_dim, seq_q, batch_heads, has_kv_tangent, dtype) -> JVPKernelConfig:
    block_d = triton.next_power_of_2(head_dim)
    if block_d > 128:
        # Correct, not tuned: the two [64, 256] fp32 accumulators alone fill the register file.
        return JVPKernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if triton.cdiv(seq_q, 128) * batch_heads < 132:
        # Too few 128-row programs to fill an H100's 132 SMs: halve the rows per program.
        return JVPKernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=3)
    if dtype == torch.float16 and block_d > 64:
        # The split probabilities (precise fp16) need the registers of 32-key steps.
        return JVPKernelConfig(block_m=128, block_n=32, num_warps=8, num_stages=3)
    if block_d <= 64 or not has_kv_tangent:
        # Two (or four small) [64, D] 16-bit tiles per stage: three stages fit in shared memory.
        return JVPKernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return JVPKernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)


def parse_config(text: str) -> JVPKernelConfig:
    """``"block_m,block_n,num_warps,num_stages[,skip_rescale[,precise[,warp_specialized]]]"``, e.g.
    ``"128,64,8,2,1,1,0"`` (this module's kernel even on Hopper)."""
    fields = [int(x) for x in text.split(",")]
    flags = dict(zip(("skip_rescale", "precise", "warp_specialized"), (bool(x) for x in fields[4:])))
    return JVPKernelConfig(*fields[:4], **flags)


@triton.jit
def _jvp_tile(
    acc_o, acc_t, m_i, l_i, r_i,
    q, q_tangent,
    k_ptrs, v_ptrs, k_tangent_ptrs, v_tangent_ptrs,
    start_n, seq_k,
    offs_n, mask_d,
    qk_scale, sm_scale,
    HAS_K_TANGENT: tl.constexpr, HAS_V_TANGENT: tl.constexpr,
    MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
    SKIP_RESCALE: tl.constexpr, SPLIT_P: tl.constexpr,
):
    # One key/value block of the online softmax with tangents. MASK_N only for the ragged last block,
    # so that full blocks pay for no masks.
    if MASK_N:
        valid_n = (start_n + offs_n) < seq_k
        kv_mask = valid_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
    kt = tl.trans(k)
    s = tl.dot(q, kt)
    ds = tl.dot(q_tangent, kt)
    if HAS_K_TANGENT:
        if MASK_N:
            k_tangent = tl.load(k_tangent_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k_tangent = tl.load(k_tangent_ptrs)
        else:
            k_tangent = tl.load(k_tangent_ptrs, mask=mask_d[None, :], other=0.0)
        ds = tl.dot(q, tl.trans(k_tangent), ds)
    if MASK_N:
        s = tl.where(valid_n[None, :], s, float("-inf"))

    # m_i is kept in log2 units of the scaled scores: p = 2^(s * scale * log2e - m).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # Masked columns have p = 0 and finite ds (their keys were loaded as zeros), so h = 0 there.
    h = p * (ds * sm_scale)
    r_i = r_i * alpha + tl.sum(h, 1)
    if SKIP_RESCALE:
        if tl.min(alpha, 0) < 1.0:
            acc_o = acc_o * alpha[:, None]
            acc_t = acc_t * alpha[:, None]
    else:
        acc_o = acc_o * alpha[:, None]
        acc_t = acc_t * alpha[:, None]

    if MASK_N:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif EVEN_D:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    # The probability-side GEMMs run on v's dtype: the input dtype, or fp16 when the wrapper converted
    # bf16 values (see JVPKernelConfig.precise).
    p_hi = p.to(v.dtype)
    h_hi = h.to(v.dtype)
    acc_o = tl.dot(p_hi, v, acc_o)
    acc_t = tl.dot(h_hi, v, acc_t)
    if SPLIT_P:
        # Second 16-bit part of p and h: together they carry ~22 bits.
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        h_lo = (h - h_hi.to(tl.float32)).to(v.dtype)
        acc_o = tl.dot(p_lo, v, acc_o)
        acc_t = tl.dot(h_lo, v, acc_t)
    if HAS_V_TANGENT:
        if MASK_N:
            v_tangent = tl.load(v_tangent_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            v_tangent = tl.load(v_tangent_ptrs)
        else:
            v_tangent = tl.load(v_tangent_ptrs, mask=mask_d[None, :], other=0.0)
        acc_t = tl.dot(p_hi, v_tangent, acc_t)
        if SPLIT_P:
            acc_t = tl.dot(p_lo, v_tangent, acc_t)
    return acc_o, acc_t, m_new, l_i, r_i


@triton.jit
def _jvp_fwd_kernel(
    Q, K, V, Q_TANGENT, K_TANGENT, V_TANGENT,
    O, O_TANGENT, LSE, MU,
    VSCALE,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tqb, stride_tqh, stride_tqm, stride_tqd,
    stride_tkb, stride_tkh, stride_tkn, stride_tkd,
    stride_tvb, stride_tvh, stride_tvn, stride_tvd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_tob, stride_toh, stride_tom, stride_tod,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm,
    num_heads, seq_q, seq_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_K_TANGENT: tl.constexpr, HAS_V_TANGENT: tl.constexpr,
    EVEN_N: tl.constexpr,
    SKIP_RESCALE: tl.constexpr, SPLIT_P: tl.constexpr, HAS_VSCALE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seq_q
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]

    # 64-bit base offsets per (batch, head); in-tile offsets stay 32-bit.
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q_tangent_ptrs = (Q_TANGENT + off_b * stride_tqb + off_h * stride_tqh
                      + offs_m[:, None] * stride_tqm + offs_d[None, :] * stride_tqd)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    q_tangent = tl.load(q_tangent_ptrs, mask=q_mask, other=0.0)

    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    k_tangent_ptrs = (K_TANGENT + off_b * stride_tkb + off_h * stride_tkh
                      + offs_n[:, None] * stride_tkn + offs_d[None, :] * stride_tkd)
    v_tangent_ptrs = (V_TANGENT + off_b * stride_tvb + off_h * stride_tvh
                      + offs_n[:, None] * stride_tvn + offs_d[None, :] * stride_tvd)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    n_full = (seq_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc_o, acc_t, m_i, l_i, r_i = _jvp_tile(
            acc_o, acc_t, m_i, l_i, r_i, q, q_tangent,
            k_ptrs, v_ptrs, k_tangent_ptrs, v_tangent_ptrs,
            start_n, seq_k, offs_n, mask_d, qk_scale, sm_scale,
            HAS_K_TANGENT, HAS_V_TANGENT, False, EVEN_D, SKIP_RESCALE, SPLIT_P,
        )
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_K_TANGENT:
            k_tangent_ptrs += BLOCK_N * stride_tkn
        if HAS_V_TANGENT:
            v_tangent_ptrs += BLOCK_N * stride_tvn
    if not EVEN_N:
        acc_o, acc_t, m_i, l_i, r_i = _jvp_tile(
            acc_o, acc_t, m_i, l_i, r_i, q, q_tangent,
            k_ptrs, v_ptrs, k_tangent_ptrs, v_tangent_ptrs,
            n_full, seq_k, offs_n, mask_d, qk_scale, sm_scale,
            HAS_K_TANGENT, HAS_V_TANGENT, True, EVEN_D, SKIP_RESCALE, SPLIT_P,
        )

    inv_l = 1.0 / l_i
    if HAS_VSCALE:
        # v and v_tangent were divided by this power of two before their conversion to fp16.
        vscale = tl.load(VSCALE)
        acc_o = acc_o * vscale
        acc_t = acc_t * vscale
    o = acc_o * inv_l[:, None]
    mu = r_i * inv_l
    o_tangent = acc_t * inv_l[:, None] - mu[:, None] * o
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453

    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    o_tangent_ptrs = (O_TANGENT + off_b * stride_tob + off_h * stride_toh
                      + offs_m[:, None] * stride_tom + offs_d[None, :] * stride_tod)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(o_tangent_ptrs, o_tangent.to(O_TANGENT.dtype.element_ty), mask=q_mask)
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm, lse, mask=mask_m)
    tl.store(MU + off_b * stride_mb + off_h * stride_mh + offs_m * stride_mm, mu, mask=mask_m)


@functools.cache
def _hopper_kernel():
    """The warp-specialised kernel's module, or None where this Triton has no Gluon for Hopper (< 3.6).
    Imported on first use: only Hopper GPUs need it."""
    try:
        from . import flash_attention_jvp_hopper
    except ImportError:
        return None
    return flash_attention_jvp_hopper


def _check_pair(name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape or x.dtype != ref.dtype or x.device != ref.device:
        raise ValueError(
            f"{name} must match its primal in shape, dtype and device: "
            f"{tuple(x.shape)} {x.dtype} {x.device} vs {tuple(ref.shape)} {ref.dtype} {ref.device}"
        )


def _values_as_fp16(v: torch.Tensor, v_tangent: torch.Tensor | None):
    """``v / c`` and ``v_tangent / c`` in fp16, and ``c``: a power of two >= 1 that keeps them under 2^15.

    bf16 -> fp16 is exact inside fp16's range; the scale (a device scalar: no host sync) guards the top
    of the range, and dividing by a power of two is exact. Costs one read of ``v`` and ``v_tangent`` for the max
    and one read + write for the conversion.
    """
    amax = torch.linalg.vector_norm(v, float("inf"), dtype=torch.float32)
    if v_tangent is not None:
        amax = torch.maximum(amax, torch.linalg.vector_norm(v_tangent, float("inf"), dtype=torch.float32))
    c = torch.exp2(torch.ceil(torch.log2(torch.clamp(amax * 2.0**-15, min=1.0))))
    inv = (1.0 / c).to(v.dtype)
    v16 = torch.mul(v, inv).to(torch.float16)
    v_tangent16 = None if v_tangent is None else torch.mul(v_tangent, inv).to(torch.float16)
    return v16, v_tangent16, c


def flash_attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_tangent: torch.Tensor,
    k_tangent: torch.Tensor | None = None,
    v_tangent: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
    config: JVPKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output and its JVP: ``(o, o_tangent, lse, mu)``.

    Args:
        q, q_tangent: ``[B, H, Sq, D]`` queries and their tangent (any strides).
        k, k_tangent: ``[B, H, Sk, D]`` keys and their tangent; ``k_tangent=None`` means a zero tangent.
        v, v_tangent: ``[B, H, Sk, D]`` values and their tangent; ``v_tangent=None`` means a zero tangent.
        scale: softmax scale, ``1/sqrt(D)`` by default.
        out: optional preallocated ``(o, o_tangent, lse, mu)``: ``[B, H, Sq, D]`` (input dtype or float32) and
            ``[B, H, Sq]`` float32; written in full.
        out_dtype: dtype of ``o, o_tangent`` when ``out`` is not given (default: the input dtype). float32 keeps
            partial results over key/value blocks unrounded until they are merged (ring attention).
        config: launch configuration; :func:`default_config` otherwise.

    Returns:
        ``o, o_tangent`` (input dtype unless asked otherwise), ``lse, mu`` float32 ``[B, H, Sq]``. Not
        differentiable: meant for the no-grad JVP pass.
    """
    if q.dim() != 4:
        raise ValueError(f"expected [B, H, S, D] tensors, got q of shape {tuple(q.shape)}")
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if k.shape != (B, H, Sk, D) or v.shape != (B, H, Sk, D):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("q, k and v must share a dtype")
    if D > 256:
        raise ValueError(f"head dim {D} > 256 is not supported")
    if Sk == 0:
        raise ValueError("empty key sequence")
    _check_pair("q_tangent", q_tangent, q)
    if k_tangent is not None:
        _check_pair("k_tangent", k_tangent, k)
    if v_tangent is not None:
        _check_pair("v_tangent", v_tangent, v)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    if out is None:
        # In q's memory layout (dense q only; else contiguous): the DiT passes [B, H, S, D] views of [S, B, H, D]
        # memory, and its permute back to [S, B, H*D] is then a view instead of a copy.
        o = torch.empty_like(q, dtype=out_dtype or q.dtype)
        o_tangent = torch.empty_like(o)
        lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
        mu = torch.empty_like(lse)
    else:
        o, o_tangent, lse, mu = out
        for name, x, shape, dtypes in (
            ("o", o, (B, H, Sq, D), (q.dtype, torch.float32)),
            ("o_tangent", o_tangent, (B, H, Sq, D), (q.dtype, torch.float32)),
            ("lse", lse, (B, H, Sq), (torch.float32,)), ("mu", mu, (B, H, Sq), (torch.float32,)),
        ):
            if tuple(x.shape) != shape or x.dtype not in dtypes or x.device != q.device:
                raise ValueError(f"out {name}: expected {shape} {dtypes}, got {tuple(x.shape)} {x.dtype}")
    if B * H * Sq == 0:
        return o, o_tangent, lse, mu

    has_k_tangent, has_v_tangent = k_tangent is not None, v_tangent is not None
    config = config or default_config(D, Sq, Sk, B * H, has_k_tangent or has_v_tangent, q.dtype)
    vscale = None
    if config.precise and q.dtype == torch.bfloat16:
        v, v_tangent, vscale = _values_as_fp16(v, v_tangent)
    if config.warp_specialized and q.is_cuda and not (config.precise and q.dtype == torch.float16):
        hopper = _hopper_kernel()
        tensors = (q, k, v, q_tangent, k_tangent, v_tangent, o, o_tangent)
        if hopper is not None and hopper.hopper_kernel_supports(*tensors):
            return hopper.flash_attention_jvp_hopper(*tensors, lse, mu, scale, vscale)
    # Pointers of absent tangents are never dereferenced (their HAS_*_TANGENT flags are compile-time): pass primals.
    k_tangent_ = k_tangent if has_k_tangent else k
    v_tangent_ = v_tangent if has_v_tangent else v
    grid = (triton.cdiv(Sq, config.block_m), B * H)
    _jvp_fwd_kernel[grid](
        q, k, v, q_tangent, k_tangent_, v_tangent_,
        o, o_tangent, lse, mu,
        vscale if vscale is not None else lse,
        float(scale),
        *q.stride(), *k.stride(), *v.stride(),
        *q_tangent.stride(), *k_tangent_.stride(), *v_tangent_.stride(),
        *o.stride(), *o_tangent.stride(), *lse.stride(), *mu.stride(),
        H, Sq, Sk,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        HAS_K_TANGENT=has_k_tangent, HAS_V_TANGENT=has_v_tangent,
        EVEN_N=(Sk % config.block_n == 0),
        SKIP_RESCALE=config.skip_rescale,
        SPLIT_P=config.precise and q.dtype == torch.float16,
        HAS_VSCALE=vscale is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return o, o_tangent, lse, mu
