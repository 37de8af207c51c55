"""torch.func.jvp over diffusers' WanTransformer3DModel in float64, with its float32 casts neutralised.

diffusers computes norms via `.float()` and builds the sinusoidal time frequencies in float32, so an unmodified
float64 model is only float32-accurate. Inside `float64_diffusers()` `Tensor.float()` keeps float64 tensors as
they are and the sinusoid is built in the timestep's dtype; attention runs on the math SDPA backend (the only
one with forward-mode AD).
"""

import contextlib
import math

import torch
from diffusers.models import embeddings
from torch.nn.attention import SDPBackend, sdpa_kernel


def _timestep_embedding_float64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                                max_period=10000):
    half = embedding_dim // 2
    dtype = timesteps.dtype if timesteps.dtype == torch.float64 else torch.float32
    exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device)
    emb = torch.exp(exponent / (half - downscale_freq_shift))
    emb = scale * timesteps[:, None].to(dtype) * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


@contextlib.contextmanager
def float64_diffusers():
    original_float = torch.Tensor.float
    original_embedding = embeddings.get_timestep_embedding

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original_float(self, *args, **kwargs)

    torch.Tensor.float = keep_float64
    embeddings.get_timestep_embedding = _timestep_embedding_float64
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.Tensor.float = original_float
        embeddings.get_timestep_embedding = original_embedding


def reference_jvp(model, latents, timestep, text, latents_tangent, timestep_tangent):
    """(velocity, tangent) of the diffusers model by torch.func.jvp (call inside float64_diffusers())."""

    def f(x, t):
        return model(x, t, text, return_dict=False)[0]

    return torch.func.jvp(f, (latents, timestep), (latents_tangent, timestep_tangent))
