"""Forward-mode (JVP) rules for the DiT's pieces.

Every function takes a primal `x` and a tangent `tx` (or None for a plain pass) and returns `(y, ty)` with
`ty = None` when `tx` is None, so each layer has one code path for the plain, the with-grad and the JVP pass.
Linear pieces run the primal and the tangent through one GEMM / one collective by stacking them along the batch
dimension (biases go to the primal half only); nonlinear pieces have explicit derivative rules. Statistics
(norms) are computed in at least float32, float64 when the inputs are float64.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def stacked(fn, x, tx, dim: int):
    """Apply a linear map `fn` to `x` and `tx` in one call, stacked along `dim`."""
    if tx is None:
        return fn(x), None
    n = x.shape[dim]
    y = fn(torch.cat([x, tx.to(x.dtype)], dim=dim))
    return y.narrow(dim, 0, n), y.narrow(dim, n, y.shape[dim] - n)


def input_tangents(latents, timestep, latents_tangent, timestep_tangent):
    """A DiT's JVP input tangents, absent ones as zeros (the timestep's in at least float32)."""
    if latents_tangent is None:
        latents_tangent = torch.zeros_like(latents)
    if timestep_tangent is None:
        timestep_tangent = torch.zeros_like(timestep, dtype=torch.promote_types(timestep.dtype, torch.float32))
    return latents_tangent, timestep_tangent


def local_matmul(layer) -> bool:
    """Whether the layer's forward is `x @ W^T` on this rank alone: a column-parallel layer without sequence-
    parallel or output gathers, or any layer at tensor-parallel size 1."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    if layer.sequence_parallel or getattr(layer, "gather_output", False) or getattr(layer, "gtp_remat_size", 1) != 1:
        return False
    return isinstance(layer, ColumnParallelLinear) or layer.tp_group.size() == 1


def _call(layer, x):
    # Without autograd a local layer is one GEMM: skip megatron's autograd function, whose host time per call
    # (~60 us) is what small inputs (an image's 4k tokens) wait on.
    if not torch.is_grad_enabled() and local_matmul(layer):
        return F.linear(x, layer.weight), layer.bias
    return layer(x)


def parallel_linear_nobias(layer, x, tx, batch_dim: int = 1):
    """megatron-core Column/RowParallelLinear built with `skip_bias_add=True`: `(y, ty, bias)` without the bias
    added, so that the consumer fuses the add (the bias belongs to the primal only)."""
    if tx is None:
        y, bias = _call(layer, x)
        return y, None, (None if bias is None else _sp_bias(layer, bias))
    n = x.shape[batch_dim]
    y2, bias = _call(layer, torch.cat([x, tx.to(x.dtype)], dim=batch_dim))
    y, ty = y2.narrow(batch_dim, 0, n), y2.narrow(batch_dim, n, y2.shape[batch_dim] - n)
    return y, ty, (None if bias is None else _sp_bias(layer, bias))


def parallel_linear(layer, x, tx, batch_dim: int = 1):
    """megatron-core Column/RowParallelLinear built with `skip_bias_add=True`: bias on the primal only."""
    y, ty, bias = parallel_linear_nobias(layer, x, tx, batch_dim)
    return (y if bias is None else y + bias), ty


def _sp_bias(layer, bias):
    # a row-parallel bias lands on sequence-parallel tokens: identity forward, all-reduce backward
    if getattr(layer, "bias_needs_sequence_parallel_replication", False) and bias.requires_grad:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(bias)
    return bias


def linear(layer: torch.nn.Linear, x, tx):
    """A replicated torch Linear (inputs in any layout, features last)."""
    if tx is None:
        return layer(x), None
    y2 = F.linear(torch.cat([x, tx.to(x.dtype)], dim=0), layer.weight)
    n = x.shape[0]
    y, ty = y2[:n], y2[n:]
    return (y if layer.bias is None else y + layer.bias), ty


def silu(x, tx):
    y = F.silu(x)
    if tx is None:
        return y, None
    s = torch.sigmoid(x)
    return y, tx * (s * (1 + x * (1 - s)))


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh(x, tx):
    y = F.gelu(x, approximate="tanh")
    if tx is None:
        return y, None
    u = _GELU_C * (x + 0.044715 * x**3)
    th = torch.tanh(u)
    dy = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x * x)
    return y, tx * dy


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_erf(x, tx):
    """Exact GELU x Phi(x); derivative Phi(x) + x phi(x)."""
    y = F.gelu(x)
    if tx is None:
        return y, None
    dy = 0.5 * (1 + torch.erf(x * _SQRT_HALF)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return y, tx * dy


def layer_norm(x, tx, eps: float, weight=None, bias=None):
    """LayerNorm over the last dimension in at least float32; returns the compute dtype."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    w = None if weight is None else weight.to(ct)
    b = None if bias is None else bias.to(ct)
    y = F.layer_norm(xf, xf.shape[-1:], w, b, eps)
    if tx is None:
        return y, None
    xc = xf - xf.mean(-1, keepdim=True)
    r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    txf = tx.to(ct)
    dxc = txf - txf.mean(-1, keepdim=True)
    n = xc * r
    dn = r * dxc - n * (r * r) * (xc * dxc).mean(-1, keepdim=True)
    return y, (dn if w is None else dn * w)


class _AllReduceSum(torch.autograd.Function):
    """All-reduce whose backward is an all-reduce too: every rank's output depends on every rank's input and
    the ranks use the result differently (megatron's reduce_from_tensor_model_parallel_region assumes the
    opposite and passes gradients through unchanged)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x, group):
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def rms_stats(x, tx, dims=(-1,)):
    """Sums of x*x (and of x*tx) over `dims`, stacked on a new last axis, in the compute dtype."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    ss = (xf * xf).sum(dim=dims, keepdim=True)
    if tx is None:
        return ss.unsqueeze(-1)
    return torch.stack([ss, (xf * tx.to(ct)).sum(dim=dims, keepdim=True)], dim=-1)


def rms_apply(x, tx, stats, weight, eps: float, full_dim: int):
    """RMSNorm from (all-reduced) `rms_stats` over `full_dim` channels; results in the compute dtype."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    r = torch.rsqrt(stats[..., 0] / full_dim + eps)
    n = xf * r
    w = weight.to(ct)
    if tx is None:
        return n * w, None
    dn = r * tx.to(ct) - n * (r * r) * (stats[..., 1] / full_dim)
    return n * w, dn * w


def rms_norm(x, tx, weight, eps: float, full_dim: int, group=None):
    """RMSNorm over the last dimension, which may be split across `group` (q/k norm across all heads under
    TP): the sums of x*x (and of x*tx for the tangent) are all-reduced in one collective."""
    stats = all_reduce_sum(rms_stats(x, tx), group)
    y, ty = rms_apply(x, tx, stats, weight, eps, full_dim)
    return y.to(x.dtype), (None if ty is None else ty.to(x.dtype))


def modulate(n, tn, shift, tshift, scale, tscale):
    """adaLN: n * (1 + scale) + shift."""
    y = n * (1 + scale) + shift
    if tn is None and tshift is None:
        return y, None
    ty = 0
    if tn is not None:
        ty = tn * (1 + scale)
    if tscale is not None:
        ty = ty + n * tscale + tshift
    return y, ty


def gated_residual(x, tx, a, ta, gate, tgate):
    """x + a * gate, in the compute dtype of the gate."""
    y = x.to(gate.dtype) + a.to(gate.dtype) * gate
    if tx is None and ta is None and tgate is None:
        return y, None
    ty = tx.to(gate.dtype) if tx is not None else 0
    if ta is not None:
        ty = ty + ta.to(gate.dtype) * gate
    if tgate is not None:
        ty = ty + a.to(gate.dtype) * tgate
    return y, ty


def add(x, tx, y, ty):
    out = x + y
    if tx is None and ty is None:
        return out, None
    if tx is None:
        return out, ty
    if ty is None:
        return out, tx
    return out, tx + ty


def cast(x, tx, dtype):
    return x.to(dtype), (None if tx is None else tx.to(dtype))
