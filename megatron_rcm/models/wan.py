"""Wan2.1 text-to-video DiT (diffusers' `WanTransformer3DModel`) on megatron-core tensor-parallel layers.

What is Wan-specific lives here: the 6-way adaLN modulation from one shared time projection, q/k RMSNorm over
all heads, the affine LayerNorm before cross-attention, RoPE on channel pairs, and the head's 2-way
modulation from the time embedding. The blocks themselves are shared (blocks.py), and so is the run from patch
tokens to the head (dit.py).
"""

import dataclasses
import math

import torch
import torch.nn.functional as F

from megatron_rcm.models import tangent as T
from megatron_rcm.models.blocks import (
    MLP,
    Attention,
    AttentionConfig,
    TextProjection,
    TimestepEmbedding,
    gated_residual,
    gated_residual_affine_norm,
    modulated_norm,
    replicate_for_sequence_parallel,
    residual_modulated_norm,
)
from megatron_rcm.models.dit import DiTModel
from megatron_rcm.models.rope import rope_angles


@dataclasses.dataclass
class WanConfig:
    """Architecture of a Wan2.1 DiT (names follow diffusers' `WanTransformer3DModel` config)."""

    num_attention_heads: int = 12
    """Attention heads; the tensor-parallel size must divide it."""
    attention_head_dim: int = 128
    """Channels per head; the model width is heads x head_dim."""
    ffn_dim: int = 8960
    """Hidden width of the feed-forward network."""
    num_layers: int = 30
    """Transformer blocks."""
    in_channels: int = 16
    """Latent channels in."""
    out_channels: int = 16
    """Latent channels out."""
    text_dim: int = 4096
    """Width of the text-encoder states (UMT5-XXL: 4096)."""
    freq_dim: int = 256
    """Width of the sinusoidal time embedding."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch size over (frames, height, width)."""
    eps: float = 1e-6
    """Epsilon of every norm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    timestep_scale: float = 1000.0
    """Timestep units of the network: timestep = timestep_scale x rectified-flow time s."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_diffusers(self) -> dict:
        """The `config.json` fields of diffusers' WanTransformer3DModel."""
        return dict(
            _class_name="WanTransformer3DModel", patch_size=list(self.patch_size),
            num_attention_heads=self.num_attention_heads, attention_head_dim=self.attention_head_dim,
            in_channels=self.in_channels, out_channels=self.out_channels, text_dim=self.text_dim,
            freq_dim=self.freq_dim, ffn_dim=self.ffn_dim, num_layers=self.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=self.eps, image_dim=None, added_kv_proj_dim=None,
            rope_max_seq_len=1024, pos_embed_seq_len=None)

    @classmethod
    def from_diffusers(cls, diffusers_config: dict) -> "WanConfig":
        unsupported = {k: diffusers_config.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
                       if diffusers_config.get(k) is not None}
        if unsupported:
            raise ValueError(f"image-conditioned Wan models are not supported (config has {unsupported})")
        qk_norm = diffusers_config.get("qk_norm", "rms_norm_across_heads")
        if not diffusers_config.get("cross_attn_norm", True) or qk_norm != "rms_norm_across_heads":
            raise ValueError("only Wan2.1 text-to-video configs (cross_attn_norm=True, qk_norm across heads) are "
                             "supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in diffusers_config.items() if k in names}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(kw["patch_size"])
        return cls(**kw)


PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    # tiny configurations for tests and CPU demos
    "wan-tiny": WanConfig(num_attention_heads=2, attention_head_dim=12, ffn_dim=48, num_layers=2, in_channels=4,
                          out_channels=4, text_dim=16, freq_dim=16),
    "wan-tiny-tp": WanConfig(num_attention_heads=4, attention_head_dim=12, ffn_dim=64, num_layers=2, in_channels=4,
                             out_channels=4, text_dim=16, freq_dim=16),
    # the CPU default's teacher and students (195K parameters; pixel-space "latents" 3 x 8 x 16 x 16)
    "wan-shapes-tiny": WanConfig(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=3,
                                 in_channels=3, out_channels=3, text_dim=16, freq_dim=32, patch_size=(1, 4, 4)),
}


class WanBlock(torch.nn.Module):
    def __init__(self, config: WanConfig, parallel_config, high_dtype: torch.dtype):
        super().__init__()
        h = config.hidden_size
        self.eps = config.eps
        self.parallel_config = parallel_config
        self.self_attention = Attention(AttentionConfig(h, config.num_attention_heads, config.attention_head_dim,
                                                        config.eps, "across_heads"), parallel_config)
        self.cross_attention_norm = torch.nn.LayerNorm(h, eps=config.eps, dtype=high_dtype)
        self.cross_attention = Attention(AttentionConfig(h, config.num_attention_heads, config.attention_head_dim,
                                                         config.eps, "across_heads", context_dim=h), parallel_config)
        self.mlp = MLP(h, config.ffn_dim, parallel_config)
        self.modulation = torch.nn.Parameter(torch.randn(1, 6, h, dtype=high_dtype) / h**0.5)

    def forward(self, x, x_tangent, cond: "_WanConditioning", rope, context, cp=None):
        """x [s, b, h]; `cond` holds the time projection [b, 6, h] (high precision) and its tangent; rope =
        (cos, sin); `cp` the context-parallel token split (None without CP)."""
        e = replicate_for_sequence_parallel(self.modulation + cond.t_proj, self.parallel_config)
        mods = [m[None] for m in e.unbind(1)]  # each [1, b, h]
        mods_tangent = [None] * 6 if cond.t_proj_tangent is None else [m[None] for m in cond.t_proj_tangent.unbind(1)]
        shift, scale, gate, c_shift, c_scale, c_gate = mods
        shift_tangent, scale_tangent, gate_tangent, c_shift_tangent, c_scale_tangent, c_gate_tangent = mods_tangent

        n, n_tangent = modulated_norm(x, x_tangent, shift, shift_tangent, scale, scale_tangent, self.eps)
        a, a_tangent, bias = self.self_attention(n, n_tangent, rope=rope, add_bias=False, cp=cp)
        # each residual update is fused with the norm that reads its result
        w = replicate_for_sequence_parallel(self.cross_attention_norm.weight, self.parallel_config)
        b = replicate_for_sequence_parallel(self.cross_attention_norm.bias, self.parallel_config)
        x, x_tangent, n, n_tangent = gated_residual_affine_norm(x, x_tangent, (a, a_tangent, bias, gate, gate_tangent),
                                                                (w, b, self.eps))
        a, a_tangent, bias = self.cross_attention(n, n_tangent, context=context, add_bias=False)
        x, x_tangent, n, n_tangent = residual_modulated_norm(
            x, x_tangent, (a, a_tangent, bias), (c_shift, c_shift_tangent, c_scale, c_scale_tangent, self.eps))
        f, f_tangent, bias = self.mlp(n, n_tangent, add_bias=False)
        return gated_residual(x, x_tangent, f, f_tangent, bias, c_gate, c_gate_tangent)


@dataclasses.dataclass
class _WanConditioning:
    """Time conditioning of one pass: the embedding (head) and the 6-way projection (blocks), with tangents."""

    temb: torch.Tensor
    temb_tangent: torch.Tensor | None
    t_proj: torch.Tensor
    t_proj_tangent: torch.Tensor | None


class WanModel(DiTModel):
    """Wan2.1 DiT. `model(latents, timestep, text)` -> velocity; `model.jvp(...)` -> (velocity, tangent);
    `forward_tokens` / `jvp_tokens` on this rank's tokens under context parallelism (dit.py).

    Built in the current megatron-core parallel layout (tensor- and context-parallel sizes from
    `parallel_state`). `params_dtype` is the dtype of the large layers; the time embedding, modulation tables,
    norms and head are kept in float32 (or in `params_dtype` when that is wider). `cp_comm`: 'auto' | 'a2a' |
    'ring', how self-attention crosses the context-parallel ranks.
    """

    _first_stage_modules = ("patch_embedding",)
    _last_stage_modules = ("head", "head_modulation")

    def __init__(self, config: WanConfig, params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                 perform_initialization: bool = True, cp_comm: str = "auto", pipeline_layers=None):
        super().__init__(config, params_dtype, sequence_parallel, perform_initialization, cp_comm, pipeline_layers)
        high = self.high_dtype
        h = config.hidden_size
        if self.stage.is_first:
            self.patch_embedding = torch.nn.Conv3d(config.in_channels, h, config.patch_size, config.patch_size,
                                                   dtype=params_dtype)
        self.time_embedding = TimestepEmbedding(config.freq_dim, h, high)
        self.time_projection = torch.nn.Linear(h, 6 * h, dtype=high)
        self.text_embedding = TextProjection(config.text_dim, h, params_dtype)
        self.blocks = self._build_blocks(lambda: WanBlock(config, self.parallel_config, high))
        if self.stage.is_last:
            self.head = torch.nn.Linear(h, config.out_channels * math.prod(config.patch_size), dtype=high)
            self.head_modulation = torch.nn.Parameter(torch.randn(1, 2, h, dtype=high) / h**0.5)
        self._finish_stage()

    # ----------------------------------------------------------------------------------------------
    def _check_inputs(self, latents, timestep, text, **kw):
        c = self.config
        if latents.dim() != 5 or latents.shape[1] != c.in_channels:
            raise ValueError(f"latents must be [B, {c.in_channels}, T, H, W], got {tuple(latents.shape)}")
        b = latents.shape[0]
        for size, p, axis in zip(latents.shape[2:], c.patch_size, "THW"):
            if size % p:
                raise ValueError(f"latent {axis}={size} is not divisible by the patch size {p}")
        if timestep.dim() != 1 or timestep.shape[0] != b:
            raise ValueError(f"timestep must be [B={b}], got {tuple(timestep.shape)}")
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != c.text_dim:
            raise ValueError(f"text must be [B={b}, L, {c.text_dim}], got {tuple(text.shape)}")
        return tuple(s // p for s, p in zip(latents.shape[2:], c.patch_size))

    def _embed(self, tokens, tokens_tangent):
        # the Conv3d with stride = kernel is one GEMM over patch tokens, features (c, pt, ph, pw) as its weight
        w = self.patch_embedding.weight.flatten(1)
        x, x_tangent = T.stacked(lambda z: F.linear(z, w), tokens, tokens_tangent, dim=0)
        return x + self.patch_embedding.bias, x_tangent

    def _conditioning(self, timestep, timestep_tangent, batch, grid, split, **kw):
        temb, temb_tangent = self.time_embedding(timestep, timestep_tangent)
        a, a_tangent = T.silu(temb, temb_tangent)
        t_proj, t_proj_tangent = T.linear(self.time_projection, a, a_tangent)
        return _WanConditioning(temb, temb_tangent, t_proj.unflatten(1, (6, -1)),
                                None if t_proj_tangent is None else t_proj_tangent.unflatten(1, (6, -1)))

    def _context(self, text, dtype):
        return self.text_embedding(text).to(dtype).transpose(0, 1)  # [L, B, h]

    def _rope_angles(self, grid, device=None, **kw):
        return rope_angles(grid, self.config.attention_head_dim, self.config.rope_theta, device=device)

    def _head(self, x, x_tangent, cond: _WanConditioning, split):
        e = self.head_modulation + cond.temb[:, None]  # [B, 2, h]
        shift, scale = e[:, 0][None], e[:, 1][None]
        shift_tangent = scale_tangent = None
        if cond.temb_tangent is not None:
            shift_tangent, scale_tangent = cond.temb_tangent[None], cond.temb_tangent[None]
        # the head runs in high precision
        n, n_tangent = modulated_norm(x, x_tangent, shift, shift_tangent, scale, scale_tangent, self.config.eps,
                                      self.high_dtype)
        y, y_tangent = T.linear(self.head, n.transpose(0, 1),
                                None if n_tangent is None else n_tangent.transpose(0, 1))  # [B, S, o]
        # the head's features are ordered (pt, ph, pw, c); patch tokens (c, pt, ph, pw)
        to_tokens = lambda z: None if z is None else z.unflatten(-1, (-1, self.config.out_channels)).transpose(
            -1, -2).flatten(-2)
        return to_tokens(y), to_tokens(y_tangent)

    # ----------------------------------------------------------------------------------------------
    def forward(self, latents, timestep, text):
        """latents [B, C, T, H, W], timestep [B] in the teacher's units (0..1000), text [B, L, text_dim]
        -> velocity [B, C, T, H, W] in the dtype of `latents`, complete on every rank."""
        return self._run(latents, timestep, text, None, None)[0]

    def jvp(self, latents, timestep, text, latents_tangent=None, timestep_tangent=None):
        """(velocity, d velocity) along (latents_tangent, timestep_tangent); text carries no tangent.
        Always runs without autograd."""
        with torch.no_grad():
            return self._run(latents, timestep, text,
                             *T.input_tangents(latents, timestep, latents_tangent, timestep_tangent))
