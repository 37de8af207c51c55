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
from megatron_rcm.models.fusion import chain, fused, switch
from megatron_rcm.models.rope import apply_rope_half, apply_rope_interleaved
from megatron_rcm.parallel import context as cp_context
from megatron_rcm.parallel import state


def build_parallel_config(params_dtype: torch.dtype, sequence_parallel: bool, perform_initialization: bool = True,
                          use_cpu_initialization: bool | None = None) -> ModelParallelConfig:
    """The megatron-core layer config for the current tensor-parallel group."""
    tp = state.tp_size()
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=bool(sequence_parallel and tp > 1),
        params_dtype=params_dtype,
        # megatron's layers allocate on the current CUDA device unless told otherwise; follow torch's default
        # device instead (CPU, or a `with torch.device("cuda")` block) so that a model is on one device
        use_cpu_initialization=(torch.empty(()).device.type != "cuda") if use_cpu_initialization is None
        else use_cpu_initialization,
        perform_initialization=perform_initialization,
        gradient_accumulation_fusion=False,
    )


def _init_normal(std: float):
    def init(w):
        return torch.nn.init.normal_(w, std=std)
    return init


def column(parallel_config: ModelParallelConfig, n_in: int, n_out: int,
           bias: bool = True) -> tensor_parallel.ColumnParallelLinear:
    return tensor_parallel.ColumnParallelLinear(
        n_in, n_out, config=parallel_config, init_method=_init_normal(1.0 / math.sqrt(n_in)), bias=bias,
        gather_output=False, skip_bias_add=True)


def row(parallel_config: ModelParallelConfig, n_in: int, n_out: int,
        bias: bool = True) -> tensor_parallel.RowParallelLinear:
    layer = tensor_parallel.RowParallelLinear(
        n_in, n_out, config=parallel_config, init_method=_init_normal(1.0 / math.sqrt(n_in)), bias=bias,
        input_is_parallel=True, skip_bias_add=True)
    if bias:
        # The bias is added to sequence-parallel tokens after `tangent.parallel_linear_nobias`, which makes its
        # gradient complete in-graph (replicate_for_sequence_parallel); megatron's separate reduction must not run too.
        layer.bias.sequence_parallel = False
        layer.bias_needs_sequence_parallel_replication = parallel_config.sequence_parallel
    return layer


def sharded_norm_weight(size_per_partition: int, dtype: torch.dtype) -> torch.nn.Parameter:
    """A norm weight split with the heads of this tensor-parallel rank."""
    w = torch.nn.Parameter(torch.ones(size_per_partition, dtype=dtype))
    set_tensor_model_parallel_attributes(w, is_parallel=True, dim=0, stride=1)
    return w


def replicate_for_sequence_parallel(x: torch.Tensor, parallel_config: ModelParallelConfig) -> torch.Tensor:
    """Mark a replicated tensor (modulation, norm affine) that is applied to sequence-parallel tokens.

    Each rank's gradient for it covers only its own tokens; the identity-forward / all-reduce-backward
    mapping makes the gradient complete and equal on every rank, so parameters never need a separate
    sequence-parallel gradient reduction (and cannot get one twice: Megatron-LM#7452)."""
    if not parallel_config.sequence_parallel or not x.requires_grad:
        return x
    return tensor_parallel.copy_to_tensor_model_parallel_region(x)


def _to_attention_layout(x):
    # [S, B, H, D] -> [B, H, S, D] view (kernels and SDPA take strides)
    return x.permute(1, 2, 0, 3)


def _from_attention_layout(o):
    # [B, H, S, D] -> [S, B, H*D]
    return o.permute(2, 0, 1, 3).flatten(2)


def _attend(q, q_tangent, k, k_tangent, v, v_tangent):
    """q/k/v in [S, B, H, D]; returns [S, B, H*D] outputs (and tangents)."""
    q, k, v = (_to_attention_layout(a) for a in (q, k, v))
    if q_tangent is None:
        return _from_attention_layout(attention(q, k, v)), None
    q_tangent = _to_attention_layout(q_tangent)
    k_tangent = None if k_tangent is None else _to_attention_layout(k_tangent)
    v_tangent = None if v_tangent is None else _to_attention_layout(v_tangent)
    o, o_tangent, _, _ = attention_jvp(q, k, v, q_tangent, k_tangent, v_tangent)
    return _from_attention_layout(o), _from_attention_layout(o_tangent)


def _attend_context_parallel(q, q_tangent, k, k_tangent, v, v_tangent, split):
    """Self-attention of this CP rank's tokens over the whole sequence (parallel/context.py); q/k/v in
    [S_local, B, H, D]; returns [S_local, B, H*D] outputs (and tangents)."""
    if split.comm == "a2a":
        parts = [q, k, v] if q_tangent is None else [q, k, v, q_tangent, k_tangent, v_tangent]
        full = cp_context.seq_to_heads(torch.stack(parts, dim=2), split)  # [S_padded, B, n, H / CP, D]
        n = split.tokens  # padded keys are dropped; padded queries attend to the real keys
        q_, k_, v_ = full[:, :, 0], full[:n, :, 1], full[:n, :, 2]
        if q_tangent is None:
            o, o_tangent = _attend(q_, None, k_, None, v_, None)
            out = o.unflatten(-1, (q_.shape[2], -1))[:, :, None]
        else:
            o, o_tangent = _attend(q_, full[:, :, 3], k_, full[:n, :, 4], v_, full[:n, :, 5])
            out = torch.stack([o, o_tangent], dim=2).unflatten(-1, (q_.shape[2], -1))
        out = cp_context.heads_to_seq(out, split).flatten(3)  # [S_local, B, 1 or 2, H*D]
        return out[:, :, 0], (None if q_tangent is None else out[:, :, 1])
    q, k, v = (_to_attention_layout(a) for a in (q, k, v))
    if q_tangent is None:
        return _from_attention_layout(cp_context.ring_attention(q, k, v, split)), None
    q_tangent, k_tangent, v_tangent = (_to_attention_layout(a) for a in (q_tangent, k_tangent, v_tangent))
    o, o_tangent = cp_context.ring_attention_jvp(q, k, v, q_tangent, k_tangent, v_tangent, split)
    return _from_attention_layout(o), _from_attention_layout(o_tangent)


def _biased_parts(y, y_tangent, bias, heads: int, n_parts: int, head_dim: int):
    """A fused projection [S, B, heads*(n_parts*head_dim)] (laid out per head) plus its bias, as
    [S, B, heads, n_parts, head_dim] in the compute dtype (the tangent gets no bias)."""
    ct = T.compute_dtype(y.dtype)
    a = y.to(ct)
    if bias is not None:
        a = a + bias.to(ct)
    a = a.unflatten(-1, (heads, n_parts, head_dim))
    a_tangent = None if y_tangent is None else y_tangent.to(ct).unflatten(-1, (heads, n_parts, head_dim))
    return a, a_tangent


@fused
def _qk_norm_stats(y, y_tangent, bias, heads: int, n_parts: int, head_dim: int, n_norm: int, per_head: bool):
    """RMS statistics of the first `n_norm` parts (q, k), per head or over all local heads:
    [S, B, 1 or heads, n_norm, 1, 1 or 2]."""
    a, a_tangent = _biased_parts(y, y_tangent, bias, heads, n_parts, head_dim)
    a = a[..., :n_norm, :]
    a_tangent = None if a_tangent is None else a_tangent[..., :n_norm, :]
    return T.rms_stats(a, a_tangent, dims=(-1,) if per_head else (-3, -1))


@fused
def _qk_norm_rope(y, y_tangent, bias, stats, weights, cos, sin, half_rope: bool, eps: float, full_dim: int, heads: int,
                  n_parts: int, head_dim: int, dtype: torch.dtype):
    """Bias, q/k RMSNorm (from all-reduced `stats`), RoPE (q/k), cast: a list of n_parts (x, x_tangent) pairs
    [S, B, heads, head_dim]; parts past the normed ones (v) only get the bias."""
    a, a_tangent = _biased_parts(y, y_tangent, bias, heads, n_parts, head_dim)
    out = []
    for i in range(n_parts):
        x, x_tangent = a[..., i, :], (None if a_tangent is None else a_tangent[..., i, :])
        if stats is not None and i < len(weights):
            x, x_tangent = T.rms_apply(x, x_tangent, stats[..., i, :, :], weights[i], eps, full_dim)
            if cos is not None:
                rotate = apply_rope_half if half_rope else apply_rope_interleaved
                x = rotate(x, cos, sin)
                x_tangent = None if x_tangent is None else rotate(x_tangent, cos, sin)
        out.append(T.cast(x, x_tangent, dtype))
    return out


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
    bias: bool = True
    """Biases on the projections (Wan: yes; Cosmos: no)."""
    rope_style: str = "interleaved"
    """RoPE on channel pairs (2i, 2i+1) ('interleaved', Wan) or on halves (x[:D/2], x[D/2:]) ('half', Cosmos)."""


@fused
def _qk_norm_rope_local(y, y_tangent, bias, weights, cos, sin, per_head: bool, half_rope: bool, eps: float,
                        full_dim: int, heads: int, n_parts: int, head_dim: int, dtype: torch.dtype):
    stats = _qk_norm_stats.__wrapped__(y, y_tangent, bias, heads, n_parts, head_dim, len(weights), per_head)
    return _qk_norm_rope.__wrapped__(y, y_tangent, bias, stats, weights, cos, sin, half_rope, eps, full_dim, heads,
                                     n_parts, head_dim, dtype)


class Attention(torch.nn.Module):
    """Self- or cross-attention with fused per-head projections, q/k RMSNorm and optional RoPE.

    The fused weight of the self-attention projection is ordered (head, {q,k,v}, channel) and that of the
    cross-attention key/value projection (head, {k,v}, channel), so that a tensor-parallel rank's contiguous
    row slice holds whole heads; checkpoints store these layouts and convert to per-projection weights.
    """

    def __init__(self, attn: AttentionConfig, parallel_config: ModelParallelConfig):
        super().__init__()
        tp = parallel_config.tensor_model_parallel_size
        if attn.num_heads % tp != 0:
            raise ValueError(f"tensor-parallel size {tp} does not divide the {attn.num_heads} attention heads")
        if attn.rope_style not in ("interleaved", "half"):
            raise ValueError(f"unknown rope_style {attn.rope_style!r}")
        self.attn = attn
        self.parallel_config = parallel_config
        self.heads_per_rank = attn.num_heads // tp
        inner = attn.num_heads * attn.head_dim
        self.is_cross = attn.context_dim is not None
        if self.is_cross:
            self.linear_q = column(parallel_config, attn.hidden_size, inner, attn.bias)
            # text tokens are not split by sequence parallelism: no gather on the key/value projection
            kv_parallel_config = dataclasses.replace(parallel_config, sequence_parallel=False)
            self.linear_kv = column(kv_parallel_config, attn.context_dim, 2 * inner, attn.bias)
        else:
            self.linear_qkv = column(parallel_config, attn.hidden_size, 3 * inner, attn.bias)
        if attn.qk_norm == "across_heads":
            self.q_norm = sharded_norm_weight(self.heads_per_rank * attn.head_dim, parallel_config.params_dtype)
            self.k_norm = sharded_norm_weight(self.heads_per_rank * attn.head_dim, parallel_config.params_dtype)
        elif attn.qk_norm == "per_head":
            self.q_norm = torch.nn.Parameter(torch.ones(attn.head_dim, dtype=parallel_config.params_dtype))
            self.k_norm = torch.nn.Parameter(torch.ones(attn.head_dim, dtype=parallel_config.params_dtype))
        elif attn.qk_norm != "none":
            raise ValueError(f"unknown qk_norm {attn.qk_norm!r}")
        self.linear_proj = row(parallel_config, inner, attn.hidden_size, attn.bias)

    def _project(self, layer, x, x_tangent, n_parts: int, norm_weights: tuple, rope):
        """Fused projection -> bias, RMSNorm of the first len(norm_weights) parts, RoPE -> list of (x, x_tangent)
        in [S, B, H, D]."""
        a = self.attn
        y, y_tangent, bias = T.parallel_linear_nobias(layer, x, x_tangent)
        cos, sin = (None, None) if rope is None else rope
        per_head = a.qk_norm == "per_head"
        full_dim = a.head_dim if per_head else a.num_heads * a.head_dim
        half_rope = a.rope_style == "half"
        args = (a.eps, full_dim, self.heads_per_rank, n_parts, a.head_dim, y.dtype)
        if a.qk_norm == "none":
            return _qk_norm_rope(y, y_tangent, bias, None, (), cos, sin, half_rope, *args)
        if not per_head:
            norm_weights = tuple(w.view(self.heads_per_rank, a.head_dim) for w in norm_weights)
        elif self.parallel_config.tensor_model_parallel_size > 1:
            # a per-head weight is replicated but each rank applies it to its own heads only
            norm_weights = tuple(tensor_parallel.copy_to_tensor_model_parallel_region(w) if w.requires_grad
                                 else w for w in norm_weights)
        if self._qkv_kernel(y, y_tangent, n_parts, len(norm_weights), cos, per_head, half_rope):
            from rcm_kernels.qkv_norm_rope import qkv_norm_rope

            parts = qkv_norm_rope(y, bias, norm_weights, cos, sin, self.heads_per_rank, a.head_dim, a.eps, n_parts)
            return [(p, None) for p in parts]
        if per_head or self.parallel_config.tensor_model_parallel_size == 1:
            # statistics are local: one fused region
            return _qk_norm_rope_local(y, y_tangent, bias, norm_weights, cos, sin, per_head, half_rope, *args)
        stats = _qk_norm_stats(y, y_tangent, bias, self.heads_per_rank, n_parts, a.head_dim, len(norm_weights), False)
        stats = T.all_reduce_sum(stats, state.tp_group())
        return _qk_norm_rope(y, y_tangent, bias, stats, norm_weights, cos, sin, half_rope, *args)

    def _qkv_kernel(self, y, y_tangent, n_parts: int, n_norm: int, cos, per_head: bool, half_rope: bool) -> bool:
        """Whether the plain attention input (no tangent, no autograd, TP=1, Wan's norm across heads, interleaved
        RoPE or none) runs as one Triton kernel (`rcm_kernels.qkv_norm_rope`): q/k/v of self-attention, q of
        cross-attention. The training config's `kernels.qkv_kernel` sets it (default on); the environment variable
        `RCM_QKV_KERNEL`, when set, overrides the config (`RCM_QKV_KERNEL=0`: off)."""
        if (y_tangent is not None or torch.is_grad_enabled() or (n_parts, n_norm) not in ((3, 2), (1, 1)) or per_head
                or half_rope or self.parallel_config.tensor_model_parallel_size != 1 or not y.is_cuda):
            return False
        if not switch("RCM_QKV_KERNEL"):
            return False
        from rcm_kernels.qkv_norm_rope import supported

        return supported(y, cos, self.heads_per_rank, self.attn.head_dim, n_parts)

    def forward(self, x, x_tangent=None, rope=None, context=None, add_bias: bool = True, cp=None):
        """x [s, b, h] (sequence-parallel shard or full); `rope` = (cos, sin) [S, 1, 1, D/2] tables for
        interleaved-pair RoPE; `context` [L, b, context_dim] for cross-attention (it carries no tangent);
        `cp`: the context-parallel token split (`parallel.context.TokenSplit`) of self-attention's tokens,
        None without context parallelism (cross-attention ignores it: its keys are local).
        Returns (out, out_tangent), or (out, out_tangent, bias) with `add_bias=False` for callers that fuse
        the output bias into what follows."""
        qn, kn = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        if self.is_cross:
            ((q, q_tangent),) = self._project(self.linear_q, x, x_tangent, 1, (qn,), None)
            (k, k_tangent), (v, v_tangent) = self._project(self.linear_kv, context, None, 2, (kn,), None)
        else:
            (q, q_tangent), (k, k_tangent), (v, v_tangent) = self._project(self.linear_qkv, x, x_tangent, 3, (qn, kn),
                                                                           rope)
        if cp is not None and not self.is_cross:
            o, o_tangent = _attend_context_parallel(q, q_tangent, k, k_tangent, v, v_tangent, cp)
        else:
            o, o_tangent = _attend(q, q_tangent, k, k_tangent, v, v_tangent)
        y, y_tangent, bias = T.parallel_linear_nobias(self.linear_proj, o, o_tangent)
        if add_bias:
            return (y if bias is None else y + bias), y_tangent
        return y, y_tangent, bias


class MLP(torch.nn.Module):
    """fc1 (column parallel) -> GELU (tanh approximation: Wan; exact 'gelu_erf': Cosmos) -> fc2 (row parallel)."""

    gelu_epilogue: bool | None = None
    """fc1 + bias + GELU-tanh as one GEMM with a GELU epilogue (`linear_gelu_tanh`) where that is valid (see
    `_gelu_epilogue`): None = on CUDA as the training config's `kernels.gelu_epilogue` sets it (default on), the
    environment variable `RCM_GELU_EPILOGUE`, when set, overriding the config; True / False force it on or off
    (tests)."""

    def __init__(self, hidden_size: int, ffn_size: int, parallel_config: ModelParallelConfig, bias: bool = True,
                 activation: str = "gelu_tanh"):
        super().__init__()
        if activation not in ("gelu_tanh", "gelu_erf"):
            raise ValueError(f"unknown activation {activation!r}")
        self.exact_gelu = activation == "gelu_erf"
        self.linear_fc1 = column(parallel_config, hidden_size, ffn_size, bias)
        self.linear_fc2 = row(parallel_config, ffn_size, hidden_size, bias)

    def _gelu_epilogue(self, x, x_tangent) -> bool:
        """Whether fc1 can skip megatron's forward: a pass without tangents or autograd (the epilogue keeps no
        pre-activation for a backward), GELU-tanh with a bias, and a layer whose forward is x @ W^T alone
        (`tangent.local_matmul`)."""
        fc1 = self.linear_fc1
        valid = (x_tangent is None and not torch.is_grad_enabled() and not self.exact_gelu and fc1.bias is not None
                 and T.local_matmul(fc1) and x.dtype == fc1.weight.dtype == fc1.bias.dtype
                 and x.dtype in (torch.float32, torch.bfloat16, torch.float16))
        if not valid or self.gelu_epilogue is not None:
            return valid and bool(self.gelu_epilogue)
        return x.is_cuda and switch("RCM_GELU_EPILOGUE")

    def forward(self, x, x_tangent=None, add_bias: bool = True):
        """Returns (out, out_tangent), or (out, out_tangent, bias) with `add_bias=False`."""
        if self._gelu_epilogue(x, x_tangent):
            fc1 = self.linear_fc1
            h, h_tangent = linear_gelu_tanh(x.flatten(0, -2), fc1.weight, fc1.bias).unflatten(0, x.shape[:-1]), None
        else:
            h, h_tangent, bias = T.parallel_linear_nobias(self.linear_fc1, x, x_tangent)
            h, h_tangent = _bias_gelu(h, h_tangent, bias, self.exact_gelu)
        y, y_tangent, bias = T.parallel_linear_nobias(self.linear_fc2, h, h_tangent)
        if add_bias:
            return (y if bias is None else y + bias), y_tangent
        return y, y_tangent, bias


def linear_gelu_tanh(x, weight, bias):
    """GELU-tanh(x @ weight^T + bias) for 2-D x. On CUDA one GEMM whose cuBLASLt epilogue adds the bias and
    applies GELU (the epilogue's GELU is the tanh approximation; where cuBLASLt does not apply, PyTorch runs the
    GEMM and then gelu(approximate='tanh')). On CPU `torch._addmm_activation` applies the exact (erf) GELU
    instead, so there this is addmm followed by GELU-tanh."""
    if x.is_cuda:
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return F.gelu(torch.addmm(bias, x, weight.t()), approximate="tanh")


@fused
def _bias_gelu(h, h_tangent, bias, exact: bool):
    if bias is not None:
        h = h + bias
    return T.gelu_erf(h, h_tangent) if exact else T.gelu_tanh(h, h_tangent)


@fused
def modulated_norm(x, x_tangent, shift, shift_tangent, scale, scale_tangent, eps: float,
                   dtype: torch.dtype | None = None):
    """LayerNorm (no affine, high precision) -> x (1 + scale) + shift -> `dtype` (default: x's dtype)."""
    n, n_tangent = T.layer_norm(x, x_tangent, eps)
    return T.cast(*T.modulate(n, n_tangent, shift, shift_tangent, scale, scale_tangent), dtype or x.dtype)


@fused
def affine_norm(x, x_tangent, weight, bias, eps: float):
    return T.cast(*T.layer_norm(x, x_tangent, eps, weight, bias), x.dtype)


@fused
def gated_residual(x, x_tangent, a, a_tangent, bias, gate, gate_tangent):
    """x + (a + bias) * gate in the gate's (high) precision -> x's dtype."""
    if bias is not None:
        a = a + bias
    return T.cast(*T.gated_residual(x, x_tangent, a, a_tangent, gate, gate_tangent), x.dtype)


@fused
def residual(x, x_tangent, a, a_tangent, bias):
    if bias is not None:
        a = a + bias
    return T.add(x, x_tangent, a, a_tangent)


# A residual update and the norm that follows it, as one region: `f(x, x_tangent, residual_args, norm_args)` ->
# (x, x_tangent, normed, normed tangent), x being the updated residual stream.
gated_residual_affine_norm = chain(gated_residual, affine_norm)
gated_residual_modulated_norm = chain(gated_residual, modulated_norm)
residual_modulated_norm = chain(residual, modulated_norm)


def sinusoidal_embedding(t, t_tangent, dim: int, max_period: float = 10000.0):
    """[cos(t f), sin(t f)] with f_k = max_period^(-k/half) (diffusers' flip_sin_to_cos=True, shift 0).
    Computed in at least float32 (float64 for float64 inputs)."""
    ct = T.compute_dtype(t.dtype)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=ct, device=t.device) / half)
    arg = t.to(ct)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    if t_tangent is None:
        return emb, None
    arg_tangent = t_tangent.to(ct)[:, None] * freqs[None]
    return emb, torch.cat([-torch.sin(arg) * arg_tangent, torch.cos(arg) * arg_tangent], dim=-1)


class TimestepEmbedding(torch.nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear, replicated, kept in float32 (float64 in float64 models)."""

    def __init__(self, freq_dim: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = torch.nn.Linear(freq_dim, hidden_size, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden_size, hidden_size, dtype=dtype)

    def forward(self, t, t_tangent=None):
        e, e_tangent = sinusoidal_embedding(t, t_tangent, self.freq_dim)
        e, e_tangent = T.cast(e, e_tangent, self.linear_1.weight.dtype)
        h, h_tangent = T.linear(self.linear_1, e, e_tangent)
        h, h_tangent = T.silu(h, h_tangent)
        return T.linear(self.linear_2, h, h_tangent)


class TextProjection(torch.nn.Module):
    """Linear -> GELU(tanh) -> Linear on text-encoder states, replicated (text carries no tangent)."""

    def __init__(self, text_dim: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = torch.nn.Linear(text_dim, hidden_size, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden_size, hidden_size, dtype=dtype)

    def forward(self, text):
        h = self.linear_1(text.to(self.linear_1.weight.dtype))
        return self.linear_2(F.gelu(h, approximate="tanh"))
