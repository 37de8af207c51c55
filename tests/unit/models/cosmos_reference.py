"""Shared helpers for Cosmos tests: a seeded diffusers reference model, its megatron-rcm twin's state dict, inputs,
and a float64 mode for torch.func.jvp over diffusers' model.

diffusers' Cosmos forward resizes the padding mask with torchvision, which is not a dependency of this project.
When torchvision is absent, `transforms.functional.resize` is provided by nearest-neighbour `F.interpolate` (what
torchvision does for tensors); the tests pass masks at the latent resolution, where both are the identity.
"""

import contextlib
import enum
import types

import torch
import torch.nn.functional as F
from diffusers import CosmosTransformer3DModel
from diffusers.models import normalization
from diffusers.models.transformers import transformer_cosmos
from wan_float64_reference import float64_diffusers

from megatron_rcm.checkpoint import cosmos as cosmos_keys
from megatron_rcm.models.cosmos import PRESETS

if not hasattr(transformer_cosmos, "transforms"):
    class _InterpolationMode(enum.Enum):
        NEAREST = "nearest"

    def _resize(img, size, interpolation=_InterpolationMode.NEAREST):
        assert interpolation == _InterpolationMode.NEAREST
        return F.interpolate(img, size=list(size), mode="nearest")

    transformer_cosmos.transforms = types.SimpleNamespace(
        InterpolationMode=_InterpolationMode, functional=types.SimpleNamespace(resize=_resize))


def diffusers_cosmos(preset="cosmos-tiny", seed: int = 0, dtype=torch.float32) -> CosmosTransformer3DModel:
    """A diffusers Cosmos model (preset name or CosmosConfig) with every parameter randomised (default init leaves
    norms at 1, tables at 0)."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    model = CosmosTransformer3DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def megatron_state_dict(model: CosmosTransformer3DModel) -> dict:
    return cosmos_keys.hf_to_mcore(model.state_dict(), model.config.num_attention_heads)


def megatron_grads(model: CosmosTransformer3DModel) -> dict:
    return cosmos_keys.hf_to_mcore({n: p.grad for n, p in model.named_parameters()}, model.config.num_attention_heads)


def inputs(batch=2, frames=3, height=6, width=8, seed=1, dtype=torch.float32, text_len=5, channels=4, text_dim=16):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, channels, frames, height, width, generator=g, dtype=dtype)
    timestep = torch.rand(batch, generator=g, dtype=dtype)  # rectified-flow time s in [0, 1]
    text = torch.randn(batch, text_len, text_dim, generator=g, dtype=dtype)
    return latents, timestep, text


def reference(model, latents, timestep, text, padding_mask=None, condition_mask=None, fps=None):
    """diffusers' output with the inputs its Cosmos2 pipelines feed (all-zero padding mask by default)."""
    if padding_mask is None:
        padding_mask = latents.new_zeros(1, 1, *latents.shape[-2:])
    if timestep.dim() == 2:  # per latent frame -> diffusers' [B, 1, T, 1, 1]
        timestep = timestep[:, None, :, None, None]
    return model(latents, timestep, text, padding_mask=padding_mask, condition_mask=condition_mask, fps=fps,
                 return_dict=False)[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------------
# float64 mode


def _rms_norm_forward_float64(self, hidden_states):
    # diffusers' RMSNorm with the statistic in the input's dtype when that is float64 (it forces float32)
    ct = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    variance = hidden_states.to(ct).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
    if self.weight is not None:
        hidden_states = hidden_states.to(self.weight.dtype) * self.weight
        if self.bias is not None:
            hidden_states = hidden_states + self.bias
    return hidden_states


def _rope_forward(self, hidden_states, fps=None, dtype=torch.float64):
    """diffusers' CosmosRotaryPosEmbed.forward with its float32 tables built in `dtype` instead."""
    _, _, num_frames, height, width = hidden_states.shape
    pe = [num_frames // self.patch_size[0], height // self.patch_size[1], width // self.patch_size[2]]
    dev = hidden_states.device
    seq = torch.arange(max(self.max_size), device=dev, dtype=dtype)

    def freqs(dim, ntk):
        r = torch.arange(0, dim, 2, device=dev, dtype=dtype)[: dim // 2] / dim
        return 1.0 / ((10000.0 * ntk) ** r)

    fh, fw, ft = freqs(self.dim_h, self.h_ntk_factor), freqs(self.dim_w, self.w_ntk_factor), freqs(self.dim_t,
                                                                                                    self.t_ntk_factor)
    emb_h = torch.outer(seq[: pe[1]], fh)[None, :, None, :].repeat(pe[0], 1, pe[2], 1)
    emb_w = torch.outer(seq[: pe[2]], fw)[None, None, :, :].repeat(pe[0], pe[1], 1, 1)
    t_pos = seq[: pe[0]] if fps is None else seq[: pe[0]] / fps * self.base_fps
    emb_t = torch.outer(t_pos, ft)[:, None, None, :].repeat(1, pe[1], pe[2], 1)
    angles = torch.cat([emb_t, emb_h, emb_w] * 2, dim=-1).flatten(0, 2)
    return torch.cos(angles), torch.sin(angles)


def _learnable_pos_forward(self, hidden_states, dtype=torch.float64):
    """diffusers' CosmosLearnablePositionalEmbed.forward with the norm in `dtype` (it forces float32)."""
    b, _, f, h, w = hidden_states.shape
    f, h, w = f // self.patch_size[0], h // self.patch_size[1], w // self.patch_size[2]
    emb = (self.pos_emb_t[:f][None, :, None, None] + self.pos_emb_h[:h][None, None, :, None]
           + self.pos_emb_w[:w][None, None, None, :]).expand(b, f, h, w, -1).flatten(1, 3)
    norm = torch.linalg.vector_norm(emb, dim=-1, keepdim=True, dtype=dtype)
    norm = torch.add(self.eps, norm, alpha=(norm.numel() / emb.numel()) ** 0.5)
    return (emb / norm).type_as(hidden_states)


@contextlib.contextmanager
def float64_cosmos():
    """Wan's float64 mode (Tensor.float keeps float64, float64 sinusoid, math SDPA) plus float64 RMSNorm statistics,
    RoPE tables and learnable-position norms for diffusers' Cosmos model."""
    patches = [(normalization.RMSNorm, _rms_norm_forward_float64),
               (transformer_cosmos.CosmosRotaryPosEmbed, _rope_forward),
               (transformer_cosmos.CosmosLearnablePositionalEmbed, _learnable_pos_forward)]
    originals = [cls.forward for cls, _ in patches]
    for cls, fn in patches:
        cls.forward = fn
    try:
        with float64_diffusers():
            yield
    finally:
        for (cls, _), fn in zip(patches, originals):
            cls.forward = fn


def reference_jvp(model, latents, timestep, text, latents_tangent, timestep_tangent, **kw):
    """(velocity, tangent) of the diffusers model by torch.func.jvp (call inside float64_cosmos())."""

    def f(x, t):
        return reference(model, x, t, text, **kw)

    return torch.func.jvp(f, (latents, timestep), (latents_tangent, timestep_tangent))
