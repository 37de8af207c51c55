"""DiT building blocks shared by the Wan and Cosmos models, on megatron-core tensor-parallel layers.

Activations inside the transformer use megatron's [s, b, h] layout. Under sequence parallelism the residual
stream is split along s across the tensor-parallel group; megatron's Column/RowParallelLinear gather and
reduce-scatter it. Every forward takes an optional tangent and returns `(out, out_tangent)` (see tangent.py).
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron_rcm.models import tangent as T
from megatron_rcm.models.attention import attention, attention_jvp
from megatron_rcm.parallel import state


def parallel_config(params_dtype: torch.dtype, sequence_parallel: bool, perform_initialization: bool = True,
                    use_cpu_initialization: bool | None = None) -> ModelParallelConfig:
    """The megatron-core layer config for the current tensor-parallel group."""
    tp = state.tp_size()
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=bool(sequence_parallel and tp > 1),
        params_dtype=params_dtype,
        use_cpu_initialization=(not torch.cuda.is_available()) if use_cpu_initialization is None
        else use_cpu_initialization,
        perform_initialization=perform_initialization,
        gradient_accumulation_fusion=False,
    )


def _init_normal(std: float):
    def init(w):
        return torch.nn.init.normal_(w, std=std)
    return init


def column(cfg: ModelParallelConfig, n_in: int, n_out: int) -> tensor_parallel.ColumnParallelLinear:
    return tensor_parallel.ColumnParallelLinear(
        n_in, n_out, config=cfg, init_method=_init_normal(1.0 / math.sqrt(n_in)), bias=True,
        gather_output=False, skip_bias_add=True)


def row(cfg: ModelParallelConfig, n_in: int, n_out: int) -> tensor_parallel.RowParallelLinear:
    layer = tensor_parallel.RowParallelLinear(
        n_in, n_out, config=cfg, init_method=_init_normal(1.0 / math.sqrt(n_in)), bias=True,
        input_is_parallel=True, skip_bias_add=True)
    # The bias is added to sequence-parallel tokens by `tangent.parallel_linear`, which makes its gradient
    # complete in-graph (replicate_for_sequence_parallel); megatron's separate reduction must not run too.
    layer.bias.sequence_parallel = False
    layer.bias_needs_sequence_parallel_replication = cfg.sequence_parallel
    return layer


def sharded_norm_weight(size_per_partition: int, dtype: torch.dtype) -> torch.nn.Parameter:
    """A norm weight split with the heads of this tensor-parallel rank."""
    w = torch.nn.Parameter(torch.ones(size_per_partition, dtype=dtype))
    set_tensor_model_parallel_attributes(w, is_parallel=True, dim=0, stride=1)
    return w


def replicate_for_sequence_parallel(x: torch.Tensor, cfg: ModelParallelConfig) -> torch.Tensor:
    """Mark a replicated tensor (modulation, norm affine) that is applied to sequence-parallel tokens.

    Each rank's gradient for it covers only its own tokens; the identity-forward / all-reduce-backward
    mapping makes the gradient complete and equal on every rank, so parameters never need a separate
    sequence-parallel gradient reduction (and cannot get one twice: Megatron-LM#7452)."""
    if not cfg.sequence_parallel or not x.requires_grad:
        return x
    return tensor_parallel.copy_to_tensor_model_parallel_region(x)


def _to_attention_layout(x):
    # [S, B, H, D] -> [B, H, S, D] view (kernels and SDPA take strides)
    return x.permute(1, 2, 0, 3)


def _from_attention_layout(o):
    # [B, H, S, D] -> [S, B, H*D]
    return o.permute(2, 0, 1, 3).flatten(2)


def _attend(q, tq, k, tk, v, tv):
    """q/k/v in [S, B, H, D]; returns [S, B, H*D] outputs (and tangents)."""
    q, k, v = (_to_attention_layout(a) for a in (q, k, v))
    if tq is None:
        return _from_attention_layout(attention(q, k, v)), None
    tq = _to_attention_layout(tq)
    tk = None if tk is None else _to_attention_layout(tk)
    tv = None if tv is None else _to_attention_layout(tv)
    o, to, _, _ = attention_jvp(q, k, v, tq, tk, tv)
    return _from_attention_layout(o), _from_attention_layout(to)


def _split_stacked(y, ty, n_parts: int, num_heads: int, head_dim: int):
    """Split a fused projection [S, B, heads*(n_parts*head_dim)] laid out per head into n_parts tensors
    [S, B, heads, head_dim] (and their tangents)."""
    def split(a):
        a = a.unflatten(-1, (num_heads, n_parts, head_dim))
        return [a[..., i, :] for i in range(n_parts)]
    parts = split(y)
    tparts = split(ty) if ty is not None else [None] * n_parts
    return list(zip(parts, tparts))


@dataclasses.dataclass
class AttentionConfig:
    hidden_size: int
    """Model width (input and output of the attention block)."""
    num_heads: int
    """Attention heads in total (split across tensor-parallel ranks)."""
    head_dim: int
    """Channels per head."""
    eps: float = 1e-6
    """Epsilon of the q/k RMSNorm."""
    qk_norm: str = "across_heads"
    """'across_heads' (Wan: RMSNorm over all heads' channels), 'per_head' (Cosmos) or 'none'."""
    context_dim: int | None = None
    """Width of the cross-attention context (None: self-attention)."""


class Attention(torch.nn.Module):
    """Self- or cross-attention with fused per-head projections, q/k RMSNorm and optional RoPE.

    The fused weight of the self-attention projection is ordered (head, {q,k,v}, channel) and that of the
    cross-attention key/value projection (head, {k,v}, channel), so that a tensor-parallel rank's contiguous
    row slice holds whole heads; checkpoints store these layouts and convert to per-projection weights.
    """

    def __init__(self, attn: AttentionConfig, cfg: ModelParallelConfig):
        super().__init__()
        tp = cfg.tensor_model_parallel_size
        if attn.num_heads % tp != 0:
            raise ValueError(f"tensor-parallel size {tp} does not divide the {attn.num_heads} attention heads")
        self.attn = attn
        self.cfg = cfg
        self.heads_per_rank = attn.num_heads // tp
        inner = attn.num_heads * attn.head_dim
        self.is_cross = attn.context_dim is not None
        if self.is_cross:
            self.linear_q = column(cfg, attn.hidden_size, inner)
            # text tokens are not split by sequence parallelism: no gather on the key/value projection
            kv_cfg = dataclasses.replace(cfg, sequence_parallel=False)
            self.linear_kv = column(kv_cfg, attn.context_dim, 2 * inner)
        else:
            self.linear_qkv = column(cfg, attn.hidden_size, 3 * inner)
        if attn.qk_norm == "across_heads":
            self.q_norm = sharded_norm_weight(self.heads_per_rank * attn.head_dim, cfg.params_dtype)
            self.k_norm = sharded_norm_weight(self.heads_per_rank * attn.head_dim, cfg.params_dtype)
        elif attn.qk_norm == "per_head":
            self.q_norm = torch.nn.Parameter(torch.ones(attn.head_dim, dtype=cfg.params_dtype))
            self.k_norm = torch.nn.Parameter(torch.ones(attn.head_dim, dtype=cfg.params_dtype))
        elif attn.qk_norm != "none":
            raise ValueError(f"unknown qk_norm {attn.qk_norm!r}")
        self.linear_proj = row(cfg, inner, attn.hidden_size)

    def _norm(self, x, tx, weight):
        """x [S, B, h, d]."""
        a = self.attn
        if a.qk_norm == "none":
            return x, tx
        if a.qk_norm == "per_head":
            return T.rms_norm(x, tx, weight, a.eps, a.head_dim)
        flat = lambda t: None if t is None else t.flatten(-2)
        y, ty = T.rms_norm(flat(x), flat(tx), weight, a.eps, a.num_heads * a.head_dim,
                           group=state.tp_group() if self.cfg.tensor_model_parallel_size > 1 else None)
        unflat = lambda t: None if t is None else t.unflatten(-1, (self.heads_per_rank, a.head_dim))
        return unflat(y), unflat(ty)

    def forward(self, x, tx=None, rope=None, context=None):
        """x [s, b, h] (sequence-parallel shard or full); `rope(t)` rotates [S, B, H, D] tensors; `context`
        [L, b, context_dim] for cross-attention (it carries no tangent)."""
        a = self.attn
        if self.is_cross:
            q, tq = T.parallel_linear(self.linear_q, x, tx)
            q = q.unflatten(-1, (self.heads_per_rank, a.head_dim))
            tq = None if tq is None else tq.unflatten(-1, (self.heads_per_rank, a.head_dim))
            kv, _ = T.parallel_linear(self.linear_kv, context, None)
            (k, tk), (v, tv) = _split_stacked(kv, None, 2, self.heads_per_rank, a.head_dim)
        else:
            qkv, tqkv = T.parallel_linear(self.linear_qkv, x, tx)
            (q, tq), (k, tk), (v, tv) = _split_stacked(qkv, tqkv, 3, self.heads_per_rank, a.head_dim)
        q, tq = self._norm(q, tq, getattr(self, "q_norm", None))
        k, tk = self._norm(k, tk, getattr(self, "k_norm", None))
        if rope is not None:
            q, tq = T.stacked(rope, q, tq, dim=1)
            k, tk = T.stacked(rope, k, tk, dim=1)
        o, to = _attend(q, tq, k, tk, v, tv)
        return T.parallel_linear(self.linear_proj, o, to)


class MLP(torch.nn.Module):
    """fc1 (column parallel) -> GELU(tanh) -> fc2 (row parallel)."""

    def __init__(self, hidden_size: int, ffn_size: int, cfg: ModelParallelConfig):
        super().__init__()
        self.linear_fc1 = column(cfg, hidden_size, ffn_size)
        self.linear_fc2 = row(cfg, ffn_size, hidden_size)

    def forward(self, x, tx=None):
        h, th = T.parallel_linear(self.linear_fc1, x, tx)
        h, th = T.gelu_tanh(h, th)
        return T.parallel_linear(self.linear_fc2, h, th)


def sinusoidal_embedding(t, tt, dim: int, max_period: float = 10000.0):
    """[cos(t f), sin(t f)] with f_k = max_period^(-k/half) (diffusers' flip_sin_to_cos=True, shift 0).
    Computed in at least float32 (float64 for float64 inputs)."""
    ct = T.compute_dtype(t.dtype)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=ct, device=t.device) / half)
    arg = t.to(ct)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    if tt is None:
        return emb, None
    targ = tt.to(ct)[:, None] * freqs[None]
    return emb, torch.cat([-torch.sin(arg) * targ, torch.cos(arg) * targ], dim=-1)


class TimestepEmbedding(torch.nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear, replicated, kept in float32 (float64 in float64 models)."""

    def __init__(self, freq_dim: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = torch.nn.Linear(freq_dim, hidden_size, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden_size, hidden_size, dtype=dtype)

    def forward(self, t, tt=None):
        e, te = sinusoidal_embedding(t, tt, self.freq_dim)
        e, te = T.cast(e, te, self.linear_1.weight.dtype)
        h, th = T.linear(self.linear_1, e, te)
        h, th = T.silu(h, th)
        return T.linear(self.linear_2, h, th)


class TextProjection(torch.nn.Module):
    """Linear -> GELU(tanh) -> Linear on text-encoder states, replicated (text carries no tangent)."""

    def __init__(self, text_dim: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = torch.nn.Linear(text_dim, hidden_size, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden_size, hidden_size, dtype=dtype)

    def forward(self, text):
        h = self.linear_1(text.to(self.linear_1.weight.dtype))
        return self.linear_2(F.gelu(h, approximate="tanh"))
