"""Scaled dot-product attention and its forward-mode derivative (JVP).

All tensors are laid out ``[B, H, S, D]`` with arbitrary strides (the DiT passes permuted views of its
``[S, B, H, D]`` activations). Entry points:

* :func:`attention` — plain attention for passes without tangents, on the fastest backend available.
* :func:`attention_jvp` — ``(o, o_tangent, lse, mu)`` for the no-grad JVP pass: the Triton FlashAttention-2
  JVP kernel on CUDA with bf16/fp16, :func:`math_attention_jvp` otherwise.
* :func:`math_attention_jvp` — explicit math (no ``torch.func``), float64-capable; the CPU path and the
  test oracle.
* :func:`merge_attention_partials` — exact merge of results over disjoint key/value blocks, for ring
  context parallelism; :func:`attention_with_lse` and :func:`attention_block_backward` — one key/value
  block's forward with its log-sum-exp and its backward against the merged output (the ring's steps).

``lse`` is the natural-log log-sum-exp of the scaled scores per query row and ``mu = d lse`` its
directional derivative; both float32 (float64 for float64 inputs), shape ``[B, H, Sq]``.

This module needs only torch (and, for the kernel, triton): no megatron-core, no diffusers.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from megatron_rcm.models.fusion import fused

__all__ = [
    "attention",
    "attention_jvp",
    "math_attention",
    "math_attention_jvp",
    "merge_attention_partials",
    "merge_attention_pair",
    "attention_with_lse",
    "attention_block_backward",
    "attention_backend",
]

AttentionJVPResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# Query rows per chunk of the math path: bounds the [chunk, Sk] score matrix on CPU.
_MATH_CHUNK_ROWS = 4096


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are computed in float32 on the math path; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Plain attention
# --------------------------------------------------------------------------------------------------


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """``softmax(scale q k^T) v`` computed in float32 (float64 for float64 inputs), chunked over queries."""
    scale = _default_scale(q, scale)
    cdt = _compute_dtype(q.dtype)
    kc, vc = k.to(cdt), v.to(cdt)
    outs = []
    for q_chunk in q.split(_MATH_CHUNK_ROWS, dim=2):
        s = torch.matmul(q_chunk.to(cdt), kc.transpose(-1, -2)) * scale
        outs.append(torch.matmul(torch.softmax(s, dim=-1), vc))
    return torch.cat(outs, dim=2).to(q.dtype)


def _sdpa_cudnn_first(q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # cuDNN first: it is the faster forward at the Wan shapes on Hopper (benchmarks/RESULTS.md, "Attention JVP
    # kernel", the SDPA rows). The priority list falls through to the next backend whenever one rejects the inputs.
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _sdpa_backend(backend):
    def run(q, k, v, scale):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return run


def _flash_attn_3(q, k, v, scale):
    # FlashAttention-3 (Hopper) takes [B, S, H, D]; a transpose of our layout is a free view.
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _flash_attn_2(q, k, v, scale):
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2)


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:  # a broken binary install raises more than ImportError
        return False


@functools.cache
def attention_backend(device_type: str, major: int = 0) -> str:
    """Name of the backend :func:`attention` uses for half-precision CUDA inputs.

    ``RCM_ATTENTION_BACKEND`` names it (``sdpa``, ``cudnn``, ``flash``, ``efficient``, ``math``, ``flash_attn``,
    ``flash_attn_3``): the training config's ``kernels.attention_backend`` sets that variable, and the variable,
    when set in the environment, overrides the config. Unset (the config's ``auto``): FlashAttention-3 on Hopper
    when installed (faster than cuDNN's forward there), else SDPA with cuDNN first. FlashAttention-2 and
    Transformer Engine's DotProductAttention are not chosen by default: the first is SDPA's FLASH backend
    (slower than cuDNN on H100) and the second runs the same cuDNN fused attention SDPA reaches.
    """
    override = os.environ.get("RCM_ATTENTION_BACKEND")
    if override:
        return override
    if device_type != "cuda":
        return "math"
    if major == 9 and _importable("flash_attn_interface"):
        return "flash_attn_3"
    return "sdpa"


def _backend_fn(name: str):
    from torch.nn.attention import SDPBackend

    table = {
        "sdpa": _sdpa_cudnn_first,
        "cudnn": _sdpa_backend(SDPBackend.CUDNN_ATTENTION),
        "flash": _sdpa_backend(SDPBackend.FLASH_ATTENTION),
        "efficient": _sdpa_backend(SDPBackend.EFFICIENT_ATTENTION),
        "flash_attn": _flash_attn_2,
        "flash_attn_3": _flash_attn_3,
    }
    if name not in table:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(table) + ['math']}")
    return table[name]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """``softmax(scale q k^T) v`` for ``[B, H, S, D]`` inputs; output in the input dtype.

    CUDA half-precision inputs go to the fastest backend available (:func:`attention_backend`); CPU and
    float32/float64 inputs to the math path (float64 stays exact, which the CPU reference tests need).
    """
    scale = _default_scale(q, scale)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        name = attention_backend("cuda", torch.cuda.get_device_capability(q.device)[0])
        if name != "math":
            return _backend_fn(name)(q, k, v, scale)
    return math_attention(q, k, v, scale=scale)


# --------------------------------------------------------------------------------------------------
# Attention with tangents
# --------------------------------------------------------------------------------------------------


def math_attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_tangent: torch.Tensor,
    k_tangent: torch.Tensor | None = None,
    v_tangent: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> AttentionJVPResult:
    """``(o, o_tangent, lse, mu)`` by explicit formulas, chunked over query rows.

    With ``s = scale q k^T``, ``p = softmax(s)``, ``ds = scale (q_tangent k^T + q k_tangent^T)``:
    ``lse = logsumexp(s)``, ``mu = sum_j p_j ds_j``, ``o = p v``,
    ``o_tangent = p v_tangent + (p * (ds - mu)) v``.
    Computed in float64 for float64 inputs, float32 otherwise; ``o, o_tangent`` are returned in ``out_dtype``
    (default: the input dtype), ``lse, mu`` in the compute dtype.
    """
    scale = _default_scale(q, scale)
    cdt = _compute_dtype(q.dtype)
    kc, vc = k.to(cdt), v.to(cdt)
    k_tangent = k_tangent.to(cdt) if k_tangent is not None else None
    v_tangent = v_tangent.to(cdt) if v_tangent is not None else None
    kt = kc.transpose(-1, -2)
    os_, o_tangents, lses, mus = [], [], [], []
    for q_chunk, q_tangent_chunk in zip(q.split(_MATH_CHUNK_ROWS, dim=2), q_tangent.split(_MATH_CHUNK_ROWS, dim=2)):
        qc, q_tangent_c = q_chunk.to(cdt), q_tangent_chunk.to(cdt)
        s = torch.matmul(qc, kt) * scale
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        ds = torch.matmul(q_tangent_c, kt)
        if k_tangent is not None:
            ds = ds + torch.matmul(qc, k_tangent.transpose(-1, -2))
        ds = ds * scale
        mu = (p * ds).sum(dim=-1)
        o = torch.matmul(p, vc)
        o_tangent = torch.matmul(p * (ds - mu.unsqueeze(-1)), vc)
        if v_tangent is not None:
            o_tangent = o_tangent + torch.matmul(p, v_tangent)
        os_.append(o)
        o_tangents.append(o_tangent)
        lses.append(lse)
        mus.append(mu)
    out_dtype = out_dtype or q.dtype
    return (
        torch.cat(os_, dim=2).to(out_dtype),
        torch.cat(o_tangents, dim=2).to(out_dtype),
        torch.cat(lses, dim=2),
        torch.cat(mus, dim=2),
    )


def _kernel_supports(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


@functools.cache
def _kernel():
    try:
        from rcm_kernels import flash_attention_jvp
    except ImportError:  # triton missing: fall back to the math path
        return None
    return flash_attention_jvp


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_tangent: torch.Tensor,
    k_tangent: torch.Tensor | None = None,
    v_tangent: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> AttentionJVPResult:
    """Attention and its JVP, ``(o, o_tangent, lse, mu)``, under ``no_grad``.

    ``k_tangent = v_tangent = None`` means zero key/value tangents (cross-attention to text), which skips two
    of the six GEMMs. On CUDA with bf16/fp16 inputs this runs the Triton kernel (fp32 accumulators); otherwise
    :func:`math_attention_jvp`. ``out_dtype=torch.float32`` keeps ``o, o_tangent`` unrounded, for partial results
    that :func:`merge_attention_partials` combines (ring attention) before one final rounding.
    """
    with torch.no_grad():
        if _kernel_supports(q):
            kernel = _kernel()
            if kernel is not None:
                return kernel(q, k, v, q_tangent, k_tangent, v_tangent, scale=scale, out_dtype=out_dtype)
        return math_attention_jvp(q, k, v, q_tangent, k_tangent, v_tangent, scale=scale, out_dtype=out_dtype)


def merge_attention_partials(parts: list[AttentionJVPResult] | tuple[AttentionJVPResult, ...]) -> AttentionJVPResult:
    """Merge ``(o, o_tangent, lse, mu)`` computed over disjoint key/value blocks into the full result.

    With ``LSE = logsumexp_b lse_b`` and ``w_b = exp(lse_b - LSE)``::

        o         = sum_b w_b o_b
        dLSE      = sum_b w_b mu_b
        o_tangent = sum_b w_b [o_tangent_b + (mu_b - dLSE) o_b]

    (the second term is ``d w_b = w_b (mu_b - dLSE)``). Parts of a plain pass carry ``o_tangent = mu = None``:
    then only ``o`` and ``lse`` are merged (``(o, None, lse, None)`` comes back). A part whose keys were all
    masked (``lse_b = -inf``) gets weight 0. Accumulates in float32 (float64 for float64 statistics); returns
    ``o, o_tangent`` in the dtype of the first part's ``o``. Give it float32 parts (``out_dtype`` of
    :func:`attention_jvp`) and round once afterwards: bf16 parts would carry one rounding each.
    """
    if len(parts) == 0:
        raise ValueError("nothing to merge")
    # merging pairwise is exact: the running (o, o_tangent, lse, mu) is itself the result over the blocks so far
    return functools.reduce(merge_attention_pair, parts[1:], tuple(parts[0]))


@fused
def _merge_pair(o1, o1_tangent, lse1, mu1, o2, o2_tangent, lse2, mu2):
    cdt = torch.float64 if lse1.dtype == torch.float64 else torch.float32
    l1, l2 = lse1.to(cdt), lse2.to(cdt)
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1, w2 = torch.exp(l1 - safe), torch.exp(l2 - safe)
    w1_, w2_ = w1.unsqueeze(-1), w2.unsqueeze(-1)
    a1 = torch.where(w1_ > 0, o1.to(cdt), 0.0)
    a2 = torch.where(w2_ > 0, o2.to(cdt), 0.0)
    o = w1_ * a1 + w2_ * a2
    if o1_tangent is None:
        return o.to(o1.dtype), None, lse, None
    m1 = torch.where(w1 > 0, mu1.to(cdt), 0.0)
    m2 = torch.where(w2 > 0, mu2.to(cdt), 0.0)
    mu = w1 * m1 + w2 * m2
    a1_tangent = torch.where(w1_ > 0, o1_tangent.to(cdt), 0.0)
    a2_tangent = torch.where(w2_ > 0, o2_tangent.to(cdt), 0.0)
    o_tangent = (w1_ * (a1_tangent + (m1 - mu).unsqueeze(-1) * a1)
                 + w2_ * (a2_tangent + (m2 - mu).unsqueeze(-1) * a2))
    return o.to(o1.dtype), o_tangent.to(o1.dtype), lse, mu


def merge_attention_pair(running: AttentionJVPResult, part: AttentionJVPResult) -> AttentionJVPResult:
    """`merge_attention_partials([running, part])` as one fused elementwise region on CUDA (each tensor read
    once): the ring's per-step merge. Plain parts carry ``o_tangent = mu = None``."""
    return _merge_pair(*running, *part)


# --------------------------------------------------------------------------------------------------
# One key/value block of ring attention: forward with the log-sum-exp, backward against merged statistics
# --------------------------------------------------------------------------------------------------


def _flash_supports(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of one key/value block, no autograd: ``o`` in float32 (float64 for float64 inputs) on the
    math path, in the input dtype from SDPA's FLASH kernel (CUDA, half precision); ``lse`` float32/float64
    ``[B, H, Sq]``."""
    scale = _default_scale(q, scale)
    with torch.no_grad():
        if _flash_supports(q):
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            return out[0], out[1]
        cdt = _compute_dtype(q.dtype)
        kt, vc = k.to(cdt).transpose(-1, -2), v.to(cdt)
        os_, lses = [], []
        for q_chunk in q.split(_MATH_CHUNK_ROWS, dim=2):
            s = torch.matmul(q_chunk.to(cdt), kt) * scale
            lse = torch.logsumexp(s, dim=-1)
            os_.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vc))
            lses.append(lse)
        return torch.cat(os_, dim=2), torch.cat(lses, dim=2)


def _flash_block_backward(do, q, k, v, o, lse, scale):
    """The FLASH backward kernel on one block against the merged ``(o, lse)``. Called in its variable-length
    form, the one torch's public ``nn.attention.varlen`` uses: the dense call of this op needs undefined
    cumulative-length tensors, which cannot be passed from Python (empty ones select the varlen path with
    zero sequences)."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    packed = lambda x: x.to(q.dtype).transpose(1, 2).reshape(-1, x.shape[1], d)  # [B*S, H, D]
    cu_q = torch.arange(0, (b + 1) * sq, sq, device=q.device, dtype=torch.int32)
    cu_k = torch.arange(0, (b + 1) * sk, sk, device=q.device, dtype=torch.int32)
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: never read
    lse_packed = lse.float().permute(1, 0, 2).reshape(h, b * sq).contiguous()  # [H, B*Sq]
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        packed(do).contiguous(), packed(q).contiguous(), packed(k).contiguous(), packed(v).contiguous(),
        packed(o).contiguous(), lse_packed, cu_q, cu_k, sq, sk, 0.0, False, rng, torch.empty(0, device=q.device),
        scale=scale)
    unpack = lambda g, s: g.reshape(b, s, h, d).transpose(1, 2).float()
    return unpack(dq, sq), unpack(dk, sk), unpack(dv, sk)


def attention_block_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                             lse: torch.Tensor, *, scale: float | None = None):
    """Gradients ``(dq, dk, dv)`` of one key/value block's share of an attention whose output ``o`` and
    log-sum-exp ``lse`` were merged over all blocks: with ``P = exp(scale q k^T - lse)`` and
    ``D = rowsum(do * o)``, ``dS = P * (do v^T - D)``, ``dq = scale dS k``, ``dk = scale dS^T q``,
    ``dv = P^T do``. Summed over the blocks these are the full attention's gradients. Returned in float32
    (float64 for float64 inputs). On CUDA in half precision: SDPA's FLASH backward kernel (its varlen form);
    elsewhere the math implementation in row chunks."""
    scale = _default_scale(q, scale)
    with torch.no_grad():
        if _flash_supports(q):
            return _flash_block_backward(do, q, k, v, o, lse, scale)
        cdt = _compute_dtype(q.dtype)
        kc, vc = k.to(cdt), v.to(cdt)
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
        dv = torch.zeros_like(dk)
        dqs = []
        rows = zip(q.split(_MATH_CHUNK_ROWS, dim=2), do.split(_MATH_CHUNK_ROWS, dim=2),
                   o.split(_MATH_CHUNK_ROWS, dim=2), lse.split(_MATH_CHUNK_ROWS, dim=2))
        for qc, doc, oc, lc in rows:
            qc, doc = qc.to(cdt), doc.to(cdt)
            p = torch.exp(torch.matmul(qc, kc.transpose(-1, -2)) * scale - lc.to(cdt).unsqueeze(-1))
            d = (doc * oc.to(cdt)).sum(-1, keepdim=True)
            ds = p * (torch.matmul(doc, vc.transpose(-1, -2)) - d)
            dqs.append(scale * torch.matmul(ds, kc))
            dk = dk + scale * torch.matmul(ds.transpose(-1, -2), qc)
            dv = dv + torch.matmul(p.transpose(-1, -2), doc)
        return torch.cat(dqs, dim=2), dk, dv
