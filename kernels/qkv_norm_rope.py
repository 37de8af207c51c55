"""Fused self-attention input: bias, q/k RMSNorm across all heads, interleaved RoPE and the q/k/v split, in Triton.

The DiT's fused projection gives, per token, ``[H, 3, D]`` channels (head, {q, k, v}, channel). Before attention
each token needs: the bias added, q and k normalised by their RMS over all ``H*D`` channels (Wan's q/k norm),
scaled by the norm weights, rotated pairwise by the token's RoPE angles, and q, k, v written as separate
``[S, B, H, D]`` tensors. All of it is one read and one write per element; this kernel does it with one program
per token, which keeps the two reductions in registers (the same region compiled by inductor spends most of its
time in a strided reduction pass over q and k).

Forward only (no tangents, no autograd): the plain passes of the teacher, the rollouts and generation. Arithmetic
matches the reference path in ``megatron_rcm.models.blocks``: float32 throughout, one rounding at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["qkv_norm_rope", "supported"]


@triton.jit
def _qkv_norm_rope_kernel(
    Y, BIAS, WQ, WK, COS, SIN, Q, K, V,
    batch, stride_y, stride_cs, eps, inv_dim,
    H: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # token (s, b) in [S, B] order
    pos = row // batch
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = (h < H) & (d < D)
    src = Y + row * stride_y + h * (3 * D) + d

    q = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(src + D, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(src + 2 * D, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = BIAS + h * (3 * D) + d
        q += tl.load(b, mask=mask, other=0.0).to(tl.float32)
        k += tl.load(b + D, mask=mask, other=0.0).to(tl.float32)
        v += tl.load(b + 2 * D, mask=mask, other=0.0).to(tl.float32)

    rq = tl.math.rsqrt(tl.sum(tl.sum(q * q, 1), 0) * inv_dim + eps)
    rk = tl.math.rsqrt(tl.sum(tl.sum(k * k, 1), 0) * inv_dim + eps)
    w = h * D + d
    q = q * rq * tl.load(WQ + w, mask=mask, other=0.0).to(tl.float32)
    k = k * rk * tl.load(WK + w, mask=mask, other=0.0).to(tl.float32)

    # RoPE on channel pairs (2i, 2i+1); the angles depend on the position only
    half = tl.arange(0, D // 2)[None, :]
    cos = tl.load(COS + pos * stride_cs + half)
    sin = tl.load(SIN + pos * stride_cs + half)
    qe, qo = tl.split(tl.reshape(q, (BLOCK_H, D // 2, 2)))
    ke, ko = tl.split(tl.reshape(k, (BLOCK_H, D // 2, 2)))
    q = tl.reshape(tl.interleave(qe * cos - qo * sin, qe * sin + qo * cos), (BLOCK_H, D))
    k = tl.reshape(tl.interleave(ke * cos - ko * sin, ke * sin + ko * cos), (BLOCK_H, D))

    dst = row * (H * D) + h * D + d
    tl.store(Q + dst, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(K + dst, k.to(K.dtype.element_ty), mask=mask)
    tl.store(V + dst, v.to(V.dtype.element_ty), mask=mask)


def supported(y: torch.Tensor, cos: torch.Tensor, heads: int, head_dim: int) -> bool:
    """Whether the kernel takes these inputs: CUDA, a 16-bit or float32 fused projection ``[S, B, H*3*D]`` with
    contiguous rows, a power-of-two head dim, float32 angle tables ``[S, 1, 1, D/2]`` with contiguous channels."""
    return (y.is_cuda and y.dim() == 3 and y.shape[-1] == heads * 3 * head_dim and y.stride(-1) == 1
            and y.stride(0) == y.shape[1] * y.stride(1) and y.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and cos.dtype == torch.float32 and cos.shape[0] == y.shape[0] and cos.shape[-1] == head_dim // 2
            and cos.stride(-1) == 1)


def qkv_norm_rope(y, bias, q_weight, k_weight, cos, sin, heads: int, head_dim: int, eps: float):
    """``y`` ``[S, B, H*3*D]`` (fused projection without its bias), ``bias`` ``[H*3*D]`` or None, norm weights
    ``[H, D]`` (or ``[H*D]``), ``cos``/``sin`` ``[S, 1, 1, D/2]`` -> ``q, k, v`` ``[S, B, H, D]`` in ``y``'s dtype:
    q and k RMS-normalised over all ``H*D`` channels, weighted and rotated; v with its bias only."""
    S, B, _ = y.shape
    q, k, v = (torch.empty((S, B, heads, head_dim), device=y.device, dtype=y.dtype) for _ in range(3))
    if S * B == 0:
        return q, k, v
    block_h = triton.next_power_of_2(heads)
    cos = cos.reshape(S, head_dim // 2)
    sin = sin.reshape(S, head_dim // 2)
    _qkv_norm_rope_kernel[(S * B,)](
        y, bias if bias is not None else y, q_weight.contiguous(), k_weight.contiguous(), cos, sin, q, k, v,
        B, y.stride(1), cos.stride(0), float(eps), 1.0 / (heads * head_dim),
        H=heads, BLOCK_H=block_h, D=head_dim, HAS_BIAS=bias is not None,
        # about 16 channels of each of q, k, v per thread: more heads get more warps instead of spilling
        num_warps=min(16, max(4, block_h * head_dim // 512)),
    )
    return q, k, v
