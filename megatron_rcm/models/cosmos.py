"""Cosmos-Predict2 DiT (diffusers' `CosmosTransformer3DModel`) on megatron-core tensor-parallel layers.

Shared with Wan (wan.py): the megatron layer config, the tangent rules (tangent.py), attention and its JVP
(attention.py), the sinusoid, the sequence-parallel replication rule, the fused elementwise regions and the run
from patch tokens to the head (dit.py). What
differs lives here; the attention and MLP are the shared blocks (blocks.py) in their bias-free, rotate-half-RoPE,
per-head-norm and exact-GELU settings:

- **Time conditioning.** The sinusoid has the model width. It feeds (a) `t_embedder` (Linear -> SiLU -> Linear to
  3 x width, no biases) whose output `temb` is added to *every* modulation, and (b) an affine RMSNorm whose output
  is the "embedded timestep". Each modulation is a low-rank (adaLN-LoRA) map of SiLU(embedded timestep):
  Linear(width -> adaln_lora_dim) -> Linear(-> 3 x width), plus `temb`. Every block has three of them (self-attention,
  cross-attention, MLP); all three residual branches are gated. The head has a 2-way one (shift, scale).
- **No biases** in any projection (patch embedding, attention, MLP, head, modulation).
- **q/k RMSNorm per head** (eps 1e-5) in self- and cross-attention; cross-attention keys/values come straight from
  the T5 states (no text projection, no norm before cross-attention).
- **MLP with exact (erf) GELU**, not the tanh approximation.
- **RoPE rotates halves** (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with per-axis NTK scaling of the base
  (theta_axis = 10000 * rope_scale_axis ** (d_axis / (d_axis - 2))) and, for videos, frame positions rescaled by
  base_fps / fps.
- **Patch embedding** is a Linear over (channels, pt, ph, pw) patches; the padding-mask channel (and for
  Video2World the condition-mask channel) is concatenated to the latents first. The head's output channels are
  ordered (ph, pw, pt, c) (diffusers' layout, not the inverse of the patchify).
- Optional **learnable extra position embedding** (Cosmos 1.0; `extra_pos_embed_type='learnable'`), RMS-normalised
  and added at the start of every block. The Cosmos-Predict2 checkpoints do not use it.

Units and inputs (from diffusers' Cosmos2 text-to-image / video-to-world pipelines): the network is a
rectified-flow velocity model called at `timestep = s` with s = sigma / (1 + sigma) in [0, 1] (not 1000 s as Wan)
on `x_s = (1 - s) x0 + s eps`; the pipelines' EDM preconditioning (c_in = c_skip = 1 - s, c_out = -s) reduces to
exactly that. Both pipelines feed an all-zero padding mask, which is this model's default. Video2World also feeds
a condition-mask channel (1 on the conditioning latent frames), a per-frame timestep (the conditioning frames at
s = 1e-4 / (1 + 1e-4)) and fps (16).
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
    gated_residual,
    gated_residual_modulated_norm,
    modulated_norm,
    replicate_for_sequence_parallel,
    sinusoidal_embedding,
)
from megatron_rcm.models.dit import DiTModel
from megatron_rcm.models.rope import rope_angles_ntk


@dataclasses.dataclass
class CosmosConfig:
    """Architecture of a Cosmos-Predict2 DiT (names follow diffusers' `CosmosTransformer3DModel` config)."""

    num_attention_heads: int = 16
    """Attention heads; the tensor-parallel size must divide it."""
    attention_head_dim: int = 128
    """Channels per head; the model width is heads x head_dim."""
    num_layers: int = 28
    """Transformer blocks."""
    mlp_ratio: float = 4.0
    """Feed-forward width / model width."""
    in_channels: int = 16
    """Channels of the network input before the padding mask: latents (16), plus the condition mask (1) for
    Video2World."""
    out_channels: int = 16
    """Latent channels out."""
    text_embed_dim: int = 1024
    """Width of the text-encoder states (T5-11B encoder: 1024)."""
    adaln_lora_dim: int = 256
    """Rank of the low-rank adaLN modulation."""
    max_size: tuple[int, int, int] = (128, 240, 240)
    """Largest latent (frames, height, width) the position tables cover."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch size over (frames, height, width)."""
    rope_scale: tuple[float, float, float] = (1.0, 4.0, 4.0)
    """Per-axis NTK scaling of the RoPE base over (frames, height, width)."""
    concat_padding_mask: bool = True
    """Concatenate a padding-mask channel to the input (every Cosmos-Predict2 checkpoint does)."""
    extra_pos_embed_type: str | None = None
    """None, or 'learnable' for an RMS-normalised learned (t, h, w) position embedding added in every block."""
    base_fps: float = 24.0
    """Frame rate at which video RoPE positions are the frame indices (positions scale by base_fps / fps)."""
    eps: float = 1e-6
    """Epsilon of the LayerNorms and of the time-embedding RMSNorm."""
    qk_norm_eps: float = 1e-5
    """Epsilon of the per-head q/k RMSNorm."""
    timestep_scale: float = 1.0
    """Timestep units of the network: timestep = timestep_scale x rectified-flow time s (Cosmos-Predict2: s itself)."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def text_dim(self) -> int:
        """Width of the text states under the name the training loop uses for every architecture."""
        return self.text_embed_dim

    @property
    def ffn_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_in_channels(self) -> int:
        return self.in_channels + (1 if self.concat_padding_mask else 0)

    def to_diffusers(self) -> dict:
        """The `config.json` fields of diffusers' CosmosTransformer3DModel."""
        return dict(
            _class_name="CosmosTransformer3DModel", in_channels=self.in_channels, out_channels=self.out_channels,
            num_attention_heads=self.num_attention_heads, attention_head_dim=self.attention_head_dim,
            num_layers=self.num_layers, mlp_ratio=self.mlp_ratio, text_embed_dim=self.text_embed_dim,
            adaln_lora_dim=self.adaln_lora_dim, max_size=list(self.max_size), patch_size=list(self.patch_size),
            rope_scale=list(self.rope_scale), concat_padding_mask=self.concat_padding_mask,
            extra_pos_embed_type=self.extra_pos_embed_type)

    @classmethod
    def from_diffusers(cls, diffusers_config: dict) -> "CosmosConfig":
        unsupported = {k: diffusers_config.get(k) for k in ("use_crossattn_projection", "controlnet_block_every_n",
                                               "img_context_dim_in") if diffusers_config.get(k)}
        if unsupported:
            raise ValueError(f"only Cosmos-Predict2 (2.0) configs are supported; Cosmos 2.5 / Transfer fields set: "
                             f"{unsupported}")
        if diffusers_config.get("extra_pos_embed_type", None) not in (None, "learnable"):
            raise ValueError(f"unknown extra_pos_embed_type {diffusers_config['extra_pos_embed_type']!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in diffusers_config.items() if k in names}
        for k in ("max_size", "patch_size", "rope_scale"):
            if k in kw:
                kw[k] = tuple(kw[k])
        # diffusers' defaults differ from ours for these two: absent keys mean diffusers' values
        kw.setdefault("rope_scale", (2.0, 1.0, 1.0))
        kw.setdefault("extra_pos_embed_type", "learnable")
        kw.setdefault("num_attention_heads", 32)
        return cls(**kw)


_T2I = dict(rope_scale=(1.0, 4.0, 4.0))
_V2W = dict(in_channels=17)  # 16 latent channels + the condition mask

PRESETS: dict[str, CosmosConfig] = {
    "cosmos-predict2-2b-t2i": CosmosConfig(num_attention_heads=16, num_layers=28, **_T2I),
    "cosmos-predict2-14b-t2i": CosmosConfig(num_attention_heads=40, num_layers=36, **_T2I),
    "cosmos-predict2-2b-v2w": CosmosConfig(num_attention_heads=16, num_layers=28, rope_scale=(1.0, 3.0, 3.0), **_V2W),
    "cosmos-predict2-14b-v2w": CosmosConfig(num_attention_heads=40, num_layers=36, rope_scale=(20 / 24, 2.0, 2.0),
                                            **_V2W),
    # tiny configurations for tests and CPU demos (head_dim 12: 4 frame, 4 height, 4 width channels)
    "cosmos-tiny": CosmosConfig(num_attention_heads=2, attention_head_dim=12, num_layers=2, in_channels=4,
                                out_channels=4, text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 16, 16),
                                rope_scale=(1.0, 2.0, 3.0)),
    "cosmos-tiny-v2w": CosmosConfig(num_attention_heads=2, attention_head_dim=12, num_layers=2, in_channels=5,
                                    out_channels=4, text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 16, 16),
                                    rope_scale=(0.8, 3.0, 3.0)),
    "cosmos-tiny-learnable": CosmosConfig(num_attention_heads=2, attention_head_dim=12, num_layers=2, in_channels=4,
                                          out_channels=4, text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 16, 16),
                                          rope_scale=(2.0, 1.0, 1.0), extra_pos_embed_type="learnable"),
    "cosmos-tiny-tp": CosmosConfig(num_attention_heads=4, attention_head_dim=12, num_layers=2, in_channels=4,
                                   out_channels=4, text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 16, 16),
                                   rope_scale=(1.0, 2.0, 3.0)),
}


# ---------------------------------------------------------------------------------------------------
# Pieces the shared blocks do not have

class AdaLNLoRA(torch.nn.Module):
    """Low-rank modulation: Linear(width -> rank) -> Linear(rank -> n x width) of SiLU(embedded timestep), + temb."""

    def __init__(self, hidden_size: int, rank: int, n: int, dtype: torch.dtype):
        super().__init__()
        self.n = n
        self.linear_1 = torch.nn.Linear(hidden_size, rank, bias=False, dtype=dtype)
        self.linear_2 = torch.nn.Linear(rank, n * hidden_size, bias=False, dtype=dtype)

    def forward(self, act, act_tangent, temb, temb_tangent):
        """act = SiLU(embedded timestep) [N, width]; temb [N, 3 x width]. Returns [N, n x width]."""
        e, e_tangent = T.linear(self.linear_2, *T.linear(self.linear_1, act, act_tangent))
        k = e.shape[-1]
        return T.add(e, e_tangent, temb[..., :k], None if temb_tangent is None else temb_tangent[..., :k])


class TimeEmbedding(torch.nn.Module):
    """Sinusoid (model width) -> (temb = Linear -> SiLU -> Linear to 3 x width, embedded = affine RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.linear_1 = torch.nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden_size, 3 * hidden_size, bias=False, dtype=dtype)
        self.norm = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, t, t_tangent=None):
        p, p_tangent = T.cast(*sinusoidal_embedding(t, t_tangent, self.hidden_size), self.linear_1.weight.dtype)
        h, h_tangent = T.silu(*T.linear(self.linear_1, p, p_tangent))
        temb, temb_tangent = T.linear(self.linear_2, h, h_tangent)
        emb, emb_tangent = T.rms_norm(p, p_tangent, self.norm, self.eps, self.hidden_size)
        return (temb, temb_tangent), (emb, emb_tangent)


class LearnablePositionEmbedding(torch.nn.Module):
    """Sum of learned frame/row/column tables, RMS-normalised per token (Cosmos 1.0's extra position embedding)."""

    def __init__(self, hidden_size: int, grid_max: tuple[int, int, int], eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.pos_emb_t = torch.nn.Parameter(torch.zeros(grid_max[0], hidden_size, dtype=dtype))
        self.pos_emb_h = torch.nn.Parameter(torch.zeros(grid_max[1], hidden_size, dtype=dtype))
        self.pos_emb_w = torch.nn.Parameter(torch.zeros(grid_max[2], hidden_size, dtype=dtype))

    def forward(self, grid):
        f, h, w = grid
        emb = (self.pos_emb_t[:f, None, None] + self.pos_emb_h[None, :h, None] + self.pos_emb_w[None, None, :w])
        emb = emb.reshape(f * h * w, 1, -1)  # [S, 1, width]
        rms = torch.linalg.vector_norm(emb, dim=-1, keepdim=True) / math.sqrt(emb.shape[-1])
        return emb / (self.eps + rms)


class CosmosBlock(torch.nn.Module):
    def __init__(self, config: CosmosConfig, parallel_config, high_dtype: torch.dtype):
        super().__init__()
        h, r = config.hidden_size, config.adaln_lora_dim
        self.eps = config.eps
        self.parallel_config = parallel_config
        self.adaln_self_attention = AdaLNLoRA(h, r, 3, high_dtype)
        heads, d = config.num_attention_heads, config.attention_head_dim
        self.self_attention = Attention(AttentionConfig(h, heads, d, config.qk_norm_eps, "per_head", bias=False,
                                                        rope_style="half"), parallel_config)
        self.adaln_cross_attention = AdaLNLoRA(h, r, 3, high_dtype)
        self.cross_attention = Attention(AttentionConfig(h, heads, d, config.qk_norm_eps, "per_head",
                                                         context_dim=config.text_embed_dim, bias=False),
                                         parallel_config)
        self.adaln_mlp = AdaLNLoRA(h, r, 3, high_dtype)
        self.mlp = MLP(h, config.ffn_dim, parallel_config, bias=False, activation="gelu_erf")

    def forward(self, x, x_tangent, cond: "_Conditioning", rope, context, cp=None):
        """Three branches x + gate * branch(LayerNorm(x) (1 + scale) + shift); each gated residual update is fused
        with the next branch's norm. `cp`: the context-parallel token split (None without CP)."""
        if cond.pos is not None:
            x = x + cond.pos.to(x.dtype)
        branches = (
            (self.adaln_self_attention, lambda n, n_tangent: self.self_attention(n, n_tangent, rope=rope, cp=cp)),
            (self.adaln_cross_attention, lambda n, n_tangent: self.cross_attention(n, n_tangent, context=context)),
            (self.adaln_mlp, self.mlp))
        x, x_tangent = cond.view(x), cond.view(x_tangent)
        (shift, shift_tangent), (scale, scale_tangent), gate = cond.modulation(branches[0][0])
        n, n_tangent = modulated_norm(x, x_tangent, shift, shift_tangent, scale, scale_tangent, self.eps)
        for i, (_, branch) in enumerate(branches):
            a, a_tangent = branch(cond.unview(n), cond.unview(n_tangent))
            update = (cond.view(a), cond.view(a_tangent), None, *gate)
            if i + 1 == len(branches):
                x, x_tangent = gated_residual(x, x_tangent, *update)
            else:
                (shift, shift_tangent), (scale, scale_tangent), gate = cond.modulation(branches[i + 1][0])
                x, x_tangent, n, n_tangent = gated_residual_modulated_norm(
                    x, x_tangent, update, (shift, shift_tangent, scale, scale_tangent, self.eps))
        return cond.unview(x), cond.unview(x_tangent)


@dataclasses.dataclass
class _Conditioning:
    """Time conditioning of one pass and how it lands on this rank's tokens [S, B, h].

    `act` = SiLU(embedded timestep) and `temb` are [B x T', ...] with T' = 1 (one timestep per sample) or the
    number of latent frames (per-frame timesteps). Per-frame modulation is applied without materialising it per
    token: when this rank's tokens are whole frames (always without sequence parallelism), tokens are viewed as
    [frames, H*W, B, h] and the modulation broadcasts as [frames, 1, B, k]; otherwise (a sequence-parallel shard
    that cuts a frame) it is gathered per token via `frame_of_token`."""

    act: torch.Tensor
    act_tangent: torch.Tensor | None
    temb: torch.Tensor
    temb_tangent: torch.Tensor | None
    batch: int
    parallel_config: object
    frames: tuple[int, int] | None = None
    """(first frame, frame count) of this rank's tokens when they are whole frames (per-frame timesteps)."""
    tokens_per_frame: int = 1
    frame_of_token: torch.Tensor | None = None
    """Frame of each of this rank's tokens (per-frame timesteps, shard not frame-aligned)."""
    pos: torch.Tensor | None = None
    """The extra (learnable) position embedding of this rank's tokens [S_local, 1, h], or None."""
    head: "_Conditioning | None" = None
    """The same conditioning on the head's tokens (the whole CP chunk, not a sequence-parallel shard)."""

    def view(self, x):
        """[S, B, h] -> the layout the modulation broadcasts over."""
        if x is None or self.frames is None:
            return x
        return x.unflatten(0, (self.frames[1], self.tokens_per_frame))

    def unview(self, x):
        if x is None or self.frames is None:
            return x
        return x.flatten(0, 1)

    def to_tokens(self, e, replicate: bool):
        """[B x T', k] -> [1, B, k], [frames, 1, B, k] or [S_local, B, k]."""
        if e is None:
            return None
        if replicate:
            e = replicate_for_sequence_parallel(e, self.parallel_config)
        e = e.unflatten(0, (self.batch, -1))  # [B, T', k]
        if self.frames is not None:
            first, n = self.frames
            return e[:, first:first + n].transpose(0, 1).unsqueeze(1)
        if self.frame_of_token is not None:
            return e[:, self.frame_of_token].transpose(0, 1)
        return e.transpose(0, 1)

    def modulation(self, adaln: AdaLNLoRA):
        e, e_tangent = adaln(self.act, self.act_tangent, self.temb, self.temb_tangent)
        e, e_tangent = self.to_tokens(e, True), self.to_tokens(e_tangent, False)
        parts = e.chunk(adaln.n, dim=-1)
        parts_tangent = e_tangent.chunk(adaln.n, dim=-1) if e_tangent is not None else [None] * adaln.n
        return list(zip(parts, parts_tangent))


class CosmosModel(DiTModel):
    """Cosmos-Predict2 DiT. `model(latents, timestep, text)` -> velocity; `model.jvp(...)` -> (velocity, tangent);
    `forward_tokens` / `jvp_tokens` on this rank's tokens under context parallelism (dit.py).

    Built in the current megatron-core parallel layout (tensor- and context-parallel sizes from
    `parallel_state`). `params_dtype` is the dtype of the large layers; the time embedding, the adaLN modulations,
    the norms and the head are kept in float32 (or in `params_dtype` when that is wider). `cp_comm`: 'auto' |
    'a2a' | 'ring', how self-attention crosses the context-parallel ranks.
    """

    _first_stage_modules = ("patch_embedding",)
    _last_stage_modules = ("head_adaln", "head")

    def __init__(self, config: CosmosConfig, params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                 perform_initialization: bool = True, cp_comm: str = "auto", pipeline_layers=None):
        super().__init__(config, params_dtype, sequence_parallel, perform_initialization, cp_comm, pipeline_layers)
        high = self.high_dtype
        h = config.hidden_size
        if self.stage.is_first:
            self.patch_embedding = torch.nn.Linear(config.patch_in_channels * math.prod(config.patch_size), h,
                                                   bias=False, dtype=params_dtype)
        self.grid_max = tuple(s // p for s, p in zip(config.max_size, config.patch_size))
        if config.extra_pos_embed_type == "learnable":
            self.extra_pos_embedding = LearnablePositionEmbedding(h, self.grid_max, config.eps, high)
        self.time_embedding = TimeEmbedding(h, config.eps, high)
        self.blocks = self._build_blocks(lambda: CosmosBlock(config, self.parallel_config, high))
        if self.stage.is_last:
            self.head_adaln = AdaLNLoRA(h, config.adaln_lora_dim, 2, high)
            self.head = torch.nn.Linear(h, config.out_channels * math.prod(config.patch_size), bias=False, dtype=high)
        self._finish_stage()

    # ----------------------------------------------------------------------------------------------
    def _check_inputs(self, latents, timestep, text, condition_mask=None, padding_mask=None, fps=None):
        c = self.config
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, C, T, H, W], got {tuple(latents.shape)}")
        b, ch, f = latents.shape[:3]
        extra = 0
        if condition_mask is not None:
            if condition_mask.dim() != 5 or condition_mask.shape[0] != b or (
                    condition_mask.shape[2:] != latents.shape[2:]):
                raise ValueError(f"condition_mask must be [B={b}, C, {', '.join(map(str, latents.shape[2:]))}], "
                                 f"got {tuple(condition_mask.shape)}")
            extra = condition_mask.shape[1]
        if ch + extra != c.in_channels:
            raise ValueError(f"latents must be [B, {c.in_channels - extra}, T, H, W] (in_channels={c.in_channels}"
                             f"{' with the condition mask' if extra else ''}), got {tuple(latents.shape)}")
        for size, p, axis in zip(latents.shape[2:], c.patch_size, "THW"):
            if size % p:
                raise ValueError(f"latent {axis}={size} is not divisible by the patch size {p}")
        grid = tuple(s // p for s, p in zip(latents.shape[2:], c.patch_size))
        # RoPE tables cover max(grid_max) positions on every axis (as diffusers'); learned tables their own sizes
        limits = self.grid_max if c.extra_pos_embed_type == "learnable" else (max(self.grid_max),) * 3
        if any(g > m for g, m in zip(grid, limits)):
            raise ValueError(f"latent grid {grid} exceeds the model's max_size {c.max_size} / patch {c.patch_size}")
        if not (timestep.dim() == 1 and timestep.shape[0] == b) and not (
                timestep.dim() == 2 and timestep.shape == (b, f) and c.patch_size[0] == 1):
            raise ValueError(f"timestep must be [B={b}] or per latent frame [B={b}, T={f}] (patch_size[0] == 1), "
                             f"got {tuple(timestep.shape)}")
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != c.text_embed_dim:
            raise ValueError(f"text must be [B={b}, L, {c.text_embed_dim}], got {tuple(text.shape)}")
        if padding_mask is not None and (padding_mask.dim() != 4 or padding_mask.shape[1] != 1
                                         or padding_mask.shape[0] not in (1, b)):
            raise ValueError(f"padding_mask must be [1 or B, 1, H, W], got {tuple(padding_mask.shape)}")
        return grid

    def _rope_angles(self, grid, device=None, fps=None):
        c = self.config
        return rope_angles_ntk(grid, c.attention_head_dim, c.rope_scale, fps, c.base_fps, device=device)

    def _rope_kwargs(self, fps=None, **kw):
        return {"fps": fps}

    def _extra_tokens(self, shape, device, condition_mask=None, padding_mask=None, fps=None):
        """The condition and padding masks (which carry no tangent), concatenated to the latents' channels."""
        b, _, f, hh, ww = shape
        extra = []  # masks are 0/1: float32 holds them exactly
        if condition_mask is not None:
            extra.append(condition_mask.to(device, torch.float32))
        if self.config.concat_padding_mask:
            if padding_mask is None:
                pad = torch.zeros(b, 1, f, hh, ww, device=device)
            else:
                # diffusers resizes the (pixel-resolution) mask to the latent size by nearest neighbour
                pad = F.interpolate(padding_mask.to(device, torch.float32), size=(hh, ww), mode="nearest")
                pad = pad.expand(b, -1, -1, -1).unsqueeze(2).expand(-1, -1, f, -1, -1)
            extra.append(pad)
        return torch.cat(extra, dim=1) if extra else None

    def _embed(self, tokens, tokens_tangent):
        return T.stacked(self.patch_embedding, tokens, tokens_tangent, dim=0)

    def _context(self, text, dtype):
        return text.to(dtype).transpose(0, 1)  # [L, B, text_embed_dim]

    def _token_conditioning(self, act, act_tangent, temb, temb_tangent, b, grid, per_frame: bool,
                            token_range) -> _Conditioning:
        """How per-sample or per-frame conditioning lands on the tokens [start, start + n) of the padded
        sequence (this rank's residual stream or CP chunk)."""
        cond = _Conditioning(act, act_tangent, temb, temb_tangent, b, self.parallel_config)
        if not per_frame:
            return cond
        s, hw = math.prod(grid), grid[1] * grid[2]
        start, n = token_range
        if start % hw == 0 and n % hw == 0 and start + n <= s:
            return dataclasses.replace(cond, frames=(start // hw, n // hw), tokens_per_frame=hw)
        # padded tokens (past the sequence) take the last frame's modulation: their outputs are dropped
        frame = (torch.arange(start, start + n, device=act.device) // hw).clamp(max=grid[0] - 1)
        return dataclasses.replace(cond, frame_of_token=frame)

    def _conditioning(self, timestep, timestep_tangent, batch, grid, split, fps=None, **kw):
        (temb, temb_tangent), (emb, emb_tangent) = self.time_embedding(
            timestep.flatten(), None if timestep_tangent is None else timestep_tangent.flatten())
        act, act_tangent = T.silu(emb, emb_tangent)
        per_frame = timestep.dim() == 2
        cond = self._token_conditioning(act, act_tangent, temb, temb_tangent, batch, grid, per_frame,
                                        self._sp_range(split, True))
        if self.config.extra_pos_embed_type == "learnable":
            cond = dataclasses.replace(cond, pos=self.split_tokens(self.extra_pos_embedding(grid), split))
        # the head's tokens: the whole CP chunk
        head = self._token_conditioning(act, act_tangent, temb, temb_tangent, batch, grid, per_frame,
                                        self._sp_range(split, False))
        return dataclasses.replace(cond, head=head)

    def _head(self, x, x_tangent, cond: _Conditioning, split):
        head_cond = cond.head
        act, act_tangent, temb, temb_tangent = cond.act, cond.act_tangent, cond.temb, cond.temb_tangent
        e, e_tangent = self.head_adaln(act, act_tangent, temb, temb_tangent)
        e, e_tangent = head_cond.to_tokens(e, False), head_cond.to_tokens(e_tangent, False)
        shift, scale = e.chunk(2, dim=-1)
        shift_tangent, scale_tangent = e_tangent.chunk(2, dim=-1) if e_tangent is not None else (None, None)
        # the head runs in high precision
        n, n_tangent = modulated_norm(head_cond.view(x), head_cond.view(x_tangent), shift, shift_tangent, scale,
                                      scale_tangent, self.config.eps, self.high_dtype)
        n, n_tangent = head_cond.unview(n), head_cond.unview(n_tangent)
        y, y_tangent = T.linear(self.head, n.transpose(0, 1),
                                None if n_tangent is None else n_tangent.transpose(0, 1))  # [B, S, o]
        # diffusers orders the head's features (ph, pw, pt, c); patch tokens are (c, pt, ph, pw)
        _, ph, pw = self.config.patch_size
        to_tokens = lambda z: None if z is None else z.unflatten(-1, (ph, pw, -1, self.config.out_channels)).permute(
            0, 1, 5, 4, 2, 3).flatten(2)
        return to_tokens(y), to_tokens(y_tangent)

    # ----------------------------------------------------------------------------------------------
    def forward(self, latents, timestep, text, condition_mask=None, padding_mask=None, fps=None):
        """latents [B, C, T, H, W] (x_s), timestep [B] (or per latent frame [B, T]) = rectified-flow time s in
        [0, 1], text [B, L, 1024] T5 states -> velocity [B, out_channels, T, H, W] in the dtype of `latents`,
        complete on every rank.

        condition_mask [B, 1, T, H, W]: Video2World's conditioning-frame indicator (the network input then has
        in_channels = C + 1). padding_mask [1 or B, 1, H', W'] (resized to the latent size): default all zeros, as
        both Cosmos-Predict2 pipelines feed. fps: video frame rate for the temporal RoPE positions (None: images, or
        frames at base_fps)."""
        return self._run(latents, timestep, text, None, None, condition_mask=condition_mask, padding_mask=padding_mask,
                         fps=fps)[0]

    def jvp(self, latents, timestep, text, latents_tangent=None, timestep_tangent=None, condition_mask=None,
            padding_mask=None, fps=None):
        """(velocity, d velocity) along (latents_tangent, timestep_tangent); text and masks carry no tangent.
        Always runs without autograd."""
        with torch.no_grad():
            return self._run(latents, timestep, text,
                             *T.input_tangents(latents, timestep, latents_tangent, timestep_tangent),
                             condition_mask=condition_mask, padding_mask=padding_mask, fps=fps)
