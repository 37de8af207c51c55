"""Forward-mode (JVP) rules for the DiT's pieces.

Every function takes a primal `x` and a tangent `x_tangent` (or None for a plain pass) and returns
`(y, y_tangent)` with `y_tangent = None` when `x_tangent` is None, so each layer has one code path for the plain,
the with-grad and the JVP pass.
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


def stacked(fn, x, x_tangent, dim: int):
    """Apply a linear map `fn` to `x` and `x_tangent` in one call, stacked along `dim`."""
    if x_tangent is None:
        return fn(x), None
    n = x.shape[dim]
    y = fn(torch.cat([x, x_tangent.to(x.dtype)], dim=dim))
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


def parallel_linear_nobias(layer, x, x_tangent, batch_dim: int = 1):
    """megatron-core Column/RowParallelLinear built with `skip_bias_add=True`: `(y, y_tangent, bias)` without the bias
    added, so that the consumer fuses the add (the bias belongs to the primal only)."""
    if x_tangent is None:
        y, bias = _call(layer, x)
        return y, None, (None if bias is None else _sp_bias(layer, bias))
    n = x.shape[batch_dim]
    y2, bias = _call(layer, torch.cat([x, x_tangent.to(x.dtype)], dim=batch_dim))
    y, y_tangent = y2.narrow(batch_dim, 0, n), y2.narrow(batch_dim, n, y2.shape[batch_dim] - n)
    return y, y_tangent, (None if bias is None else _sp_bias(layer, bias))


def _sp_bias(layer, bias):
    # a row-parallel bias lands on sequence-parallel tokens: identity forward, all-reduce backward
    if getattr(layer, "bias_needs_sequence_parallel_replication", False) and bias.requires_grad:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(bias)
    return bias


def linear(layer: torch.nn.Linear, x, x_tangent):
    """A replicated torch Linear (inputs in any layout, features last)."""
    if x_tangent is None:
        return layer(x), None
    y2 = F.linear(torch.cat([x, x_tangent.to(x.dtype)], dim=0), layer.weight)
    n = x.shape[0]
    y, y_tangent = y2[:n], y2[n:]
    return (y if layer.bias is None else y + layer.bias), y_tangent


def silu(x, x_tangent):
    y = F.silu(x)
    if x_tangent is None:
        return y, None
    s = torch.sigmoid(x)
    return y, x_tangent * (s * (1 + x * (1 - s)))


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh(x, x_tangent):
    y = F.gelu(x, approximate="tanh")
    if x_tangent is None:
        return y, None
    u = _GELU_C * (x + 0.044715 * x**3)
    th = torch.tanh(u)
    dy = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x * x)
    return y, x_tangent * dy


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_erf(x, x_tangent):
    """Exact GELU x Phi(x); derivative Phi(x) + x phi(x)."""
    y = F.gelu(x)
    if x_tangent is None:
        return y, None
    dy = 0.5 * (1 + torch.erf(x * _SQRT_HALF)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return y, x_tangent * dy


def layer_norm(x, x_tangent, eps: float, weight=None, bias=None):
    """LayerNorm over the last dimension in at least float32; returns the compute dtype."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    w = None if weight is None else weight.to(ct)
    b = None if bias is None else bias.to(ct)
    y = F.layer_norm(xf, xf.shape[-1:], w, b, eps)
    if x_tangent is None:
        return y, None
    xc = xf - xf.mean(-1, keepdim=True)
    r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xf_tangent = x_tangent.to(ct)
    dxc = xf_tangent - xf_tangent.mean(-1, keepdim=True)
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


def rms_stats(x, x_tangent, dims=(-1,)):
    """Sums of x*x (and of x*x_tangent) over `dims`, stacked on a new last axis, in the compute dtype."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    ss = (xf * xf).sum(dim=dims, keepdim=True)
    if x_tangent is None:
        return ss.unsqueeze(-1)
    return torch.stack([ss, (xf * x_tangent.to(ct)).sum(dim=dims, keepdim=True)], dim=-1)


def rms_apply(x, x_tangent, stats, weight, eps: float, full_dim: int):
    """RMSNorm from (all-reduced) `rms_stats` over `full_dim` channels; results in the compute dtype."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    r = torch.rsqrt(stats[..., 0] / full_dim + eps)
    n = xf * r
    w = weight.to(ct)
    if x_tangent is None:
        return n * w, None
    dn = r * x_tangent.to(ct) - n * (r * r) * (stats[..., 1] / full_dim)
    return n * w, dn * w


def rms_norm(x, x_tangent, weight, eps: float, full_dim: int, group=None):
    """RMSNorm over the last dimension, which may be split across `group` (q/k norm across all heads under
    TP): the sums of x*x (and of x*x_tangent for the tangent) are all-reduced in one collective."""
    stats = all_reduce_sum(rms_stats(x, x_tangent), group)
    y, y_tangent = rms_apply(x, x_tangent, stats, weight, eps, full_dim)
    return y.to(x.dtype), (None if y_tangent is None else y_tangent.to(x.dtype))


def modulate(n, n_tangent, shift, shift_tangent, scale, scale_tangent):
    """adaLN: n * (1 + scale) + shift."""
    y = n * (1 + scale) + shift
    if n_tangent is None and shift_tangent is None:
        return y, None
    y_tangent = 0
    if n_tangent is not None:
        y_tangent = n_tangent * (1 + scale)
    if scale_tangent is not None:
        y_tangent = y_tangent + n * scale_tangent + shift_tangent
    return y, y_tangent


def gated_residual(x, x_tangent, a, a_tangent, gate, gate_tangent):
    """x + a * gate, in the compute dtype of the gate."""
    y = x.to(gate.dtype) + a.to(gate.dtype) * gate
    if x_tangent is None and a_tangent is None and gate_tangent is None:
        return y, None
    y_tangent = x_tangent.to(gate.dtype) if x_tangent is not None else 0
    if a_tangent is not None:
        y_tangent = y_tangent + a_tangent.to(gate.dtype) * gate
    if gate_tangent is not None:
        y_tangent = y_tangent + a.to(gate.dtype) * gate_tangent
    return y, y_tangent


def add(x, x_tangent, y, y_tangent):
    out = x + y
    if x_tangent is None and y_tangent is None:
        return out, None
    if x_tangent is None:
        return out, y_tangent
    if y_tangent is None:
        return out, x_tangent
    return out, x_tangent + y_tangent


def cast(x, x_tangent, dtype):
    return x.to(dtype), (None if x_tangent is None else x_tangent.to(dtype))
