"""Fused attention input: bias, q/k RMSNorm across all heads, interleaved RoPE and the q/k/v split, in Triton.

A fused projection gives, per token, ``[H, P, D]`` channels (head, part, channel) with ``P = 3`` parts
``{q, k, v}`` (self-attention) or ``P = 1``, ``q`` alone (the query of cross-attention). Before attention each
token needs: the bias added, q (and k) normalised by their RMS over all ``H*D`` channels (Wan's q/k norm),
scaled by the norm weights, optionally rotated pairwise by the token's RoPE angles, and the parts written as
separate ``[S, B, H, D]`` tensors. All of it is one read and one write per element; this kernel does it with one
program per token, which keeps the reductions in registers (the same region compiled by inductor spends most of
its time in a strided reduction pass over q and k).

Forward only (no tangents, no autograd): the plain passes of the teacher, the rollouts and generation. Arithmetic
matches the reference path in ``megatron_rcm.models.blocks``: float32 throughout, one rounding at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["qkv_norm_rope", "supported"]


@triton.jit
def _rope_pairs(x, cos, sin, BLOCK_H: tl.constexpr, D: tl.constexpr):
    # channel pairs (2i, 2i+1) rotated by the token's angles
    xe, xo = tl.split(tl.reshape(x, (BLOCK_H, D // 2, 2)))
    return tl.reshape(tl.interleave(xe * cos - xo * sin, xe * sin + xo * cos), (BLOCK_H, D))


@triton.jit
def _qkv_norm_rope_kernel(
    Y, BIAS, WQ, WK, COS, SIN, Q, K, V,
    batch, stride_y, stride_cs, eps, inv_dim,
    H: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ROPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # token (s, b) in [S, B] order
    pos = row // batch
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = (h < H) & (d < D)
    src = Y + row * stride_y + h * (PARTS * D) + d
    w = h * D + d
    dst = row * (H * D) + w
    if HAS_ROPE:
        half = tl.arange(0, D // 2)[None, :]
        cos = tl.load(COS + pos * stride_cs + half)
        sin = tl.load(SIN + pos * stride_cs + half)

    q = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        q += tl.load(BIAS + h * (PARTS * D) + d, mask=mask, other=0.0).to(tl.float32)
    rq = tl.math.rsqrt(tl.sum(tl.sum(q * q, 1), 0) * inv_dim + eps)
    q = q * rq * tl.load(WQ + w, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        q = _rope_pairs(q, cos, sin, BLOCK_H, D)
    tl.store(Q + dst, q.to(Q.dtype.element_ty), mask=mask)

    if PARTS == 3:
        k = tl.load(src + D, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(src + 2 * D, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = BIAS + h * (3 * D) + d
            k += tl.load(b + D, mask=mask, other=0.0).to(tl.float32)
            v += tl.load(b + 2 * D, mask=mask, other=0.0).to(tl.float32)
        rk = tl.math.rsqrt(tl.sum(tl.sum(k * k, 1), 0) * inv_dim + eps)
        k = k * rk * tl.load(WK + w, mask=mask, other=0.0).to(tl.float32)
        if HAS_ROPE:
            k = _rope_pairs(k, cos, sin, BLOCK_H, D)
        tl.store(K + dst, k.to(K.dtype.element_ty), mask=mask)
        tl.store(V + dst, v.to(V.dtype.element_ty), mask=mask)


def supported(y: torch.Tensor, cos: torch.Tensor | None, heads: int, head_dim: int, parts: int = 3) -> bool:
    """Whether the kernel takes these inputs: CUDA, a 16-bit or float32 fused projection ``[S, B, H*parts*D]``
    (``parts`` 3 or 1) with contiguous rows, a power-of-two head dim, and either no RoPE or float32 angle tables
    ``[S, 1, 1, D/2]`` with contiguous channels."""
    ok = (y.is_cuda and y.dim() == 3 and parts in (1, 3) and y.shape[-1] == heads * parts * head_dim
          and y.stride(-1) == 1 and y.stride(0) == y.shape[1] * y.stride(1)
          and y.dtype in (torch.bfloat16, torch.float16, torch.float32)
          and head_dim >= 16 and head_dim & (head_dim - 1) == 0)
    if cos is None:
        return ok
    return (ok and cos.dtype == torch.float32 and cos.shape[0] == y.shape[0] and cos.shape[-1] == head_dim // 2
            and cos.stride(-1) == 1)


def qkv_norm_rope(y, bias, norm_weights: tuple, cos, sin, heads: int, head_dim: int, eps: float, parts: int = 3):
    """``y`` ``[S, B, H*parts*D]`` (fused projection without its bias), ``bias`` ``[H*parts*D]`` or None, norm
    weights ``(q_weight, k_weight)`` (``(q_weight,)`` for ``parts=1``), each ``[H, D]`` or ``[H*D]``, ``cos``/``sin``
    ``[S, 1, 1, D/2]`` or None -> ``parts`` tensors ``[S, B, H, D]`` in ``y``'s dtype: q (and k) RMS-normalised over
    all ``H*D`` channels, weighted and rotated; v with its bias only."""
    if parts not in (1, 3) or len(norm_weights) != (2 if parts == 3 else 1):
        raise ValueError(f"parts must be 3 (q, k, v; two norm weights) or 1 (q; one), got {parts} parts and "
                         f"{len(norm_weights)} weights")
    S, B, _ = y.shape
    out = [torch.empty((S, B, heads, head_dim), device=y.device, dtype=y.dtype) for _ in range(parts)]
    if S * B == 0:
        return out
    block_h = triton.next_power_of_2(heads)
    wq = norm_weights[0].contiguous()
    wk = norm_weights[-1].contiguous()
    if cos is not None:
        cos, sin = cos.reshape(S, head_dim // 2), sin.reshape(S, head_dim // 2)
    q, k, v = (out * 3) if parts == 1 else out
    _qkv_norm_rope_kernel[(S * B,)](
        y, bias if bias is not None else y, wq, wk, y if cos is None else cos, y if sin is None else sin, q, k, v,
        B, y.stride(1), 0 if cos is None else cos.stride(0), float(eps), 1.0 / (heads * head_dim),
        H=heads, BLOCK_H=block_h, D=head_dim, PARTS=parts, HAS_BIAS=bias is not None, HAS_ROPE=cos is not None,
        # about 16 channels of each part per thread: more heads get more warps instead of spilling
        num_warps=min(16, max(4, block_h * head_dim // 512)),
    )
    return out
