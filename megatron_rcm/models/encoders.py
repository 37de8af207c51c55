"""Frozen encoders around the DiT: the Wan VAE (video <-> latents) and the UMT5 text encoder.

Both load from local folders only (a diffusers Wan checkpoint folder with ``vae/``, ``text_encoder/``
and ``tokenizer/``, or the component folder itself); nothing is downloaded.

Conventions follow diffusers' ``WanPipeline``:
- latents are normalised per channel with the VAE config's ``latents_mean`` / ``latents_std``:
  ``z_norm = (z - mean) / std``; the posterior mean (not a sample) is the latent, as in Wan's own code.
- captions are cleaned (html-unescaped, ftfy if installed, whitespace collapsed), tokenised to 512
  tokens, encoded with the attention mask, and the positions after each caption's length are zeroed.
"""

import html
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

#: Wan2.1's default negative prompt (its sampling config), used for classifier-free guidance.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def _component_path(path: str | os.PathLike, subfolder: str) -> str:
    """``path/subfolder`` for a whole-pipeline folder, else ``path`` (a component folder)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{subfolder}: local folder not found: {path!r} (weights are never downloaded)")
    candidate = os.path.join(path, subfolder)
    return candidate if os.path.isdir(candidate) else path


# ---------------------------------------------------------------------------------------------------
# VAE


class WanVAE(torch.nn.Module):
    """Wan2.1 VAE (diffusers ``AutoencoderKLWan``) with the latent normalisation the DiT is trained on.

    ``encode``: video ``[B, 3, F, H, W]`` in [-1, 1] -> normalised latents ``[B, 16, 1 + (F-1)//4, H/8, W/8]``.
    ``decode``: the inverse map, clamped to [-1, 1].
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        z_dim = vae.config.z_dim
        self.register_buffer("latents_mean", torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1), False)
        self.register_buffer("latents_std", torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1), False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device=None) -> "WanVAE":
        """Load from a local diffusers Wan folder (``vae/`` inside) or the VAE folder itself."""
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(_component_path(path, "vae"), torch_dtype=dtype, local_files_only=True)
        return cls(vae).to(device)

    @property
    def z_dim(self) -> int:
        return self.vae.config.z_dim

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.scale_factor_temporal or 4

    @property
    def spatial_factor(self) -> int:
        return self.vae.config.scale_factor_spatial or 8

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of the latent of one ``frames x height x width`` clip."""
        if (frames - 1) % self.temporal_factor or height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(
                f"clip {frames}x{height}x{width} does not fit the VAE: frames must be "
                f"{self.temporal_factor}k+1 and height/width multiples of {self.spatial_factor}"
            )
        return (
            self.z_dim,
            1 + (frames - 1) // self.temporal_factor,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[B, 3, F, H, W]`` in [-1, 1] -> normalised latents (float32)."""
        param = next(self.vae.parameters())
        z = self.vae.encode(video.to(param.device, param.dtype)).latent_dist.mode().float()
        return (z - self.latents_mean.float()) / self.latents_std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> video ``[B, 3, F, H, W]`` in [-1, 1] (float32)."""
        param = next(self.vae.parameters())
        z = latents.float() * self.latents_std.float() + self.latents_mean.float()
        return self.vae.decode(z.to(param.device, param.dtype)).sample.float().clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Text encoder


def clean_prompt(text: str) -> str:
    """The prompt cleaning of diffusers' Wan pipeline: ftfy (if installed), html-unescape, collapse spaces."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class TextEncoderConfig:
    """How captions become DiT conditioning."""

    max_length: int = 512
    """Tokens per caption (Wan: 512); longer captions are truncated, the rest is zero padding."""

    cache_size: int = 4096
    """Captions whose embeddings are kept (least recently used dropped first); 0 disables the cache.
    An entry is ``length x hidden`` values on the CPU (about 0.4 MB for a 50-token caption of UMT5-XXL in bf16)."""


class UMT5TextEncoder(torch.nn.Module):
    """UMT5 encoder + tokenizer: captions -> ``[B, max_length, hidden]`` embeddings padded with zeros.

    Embeddings are cached per caption (unpadded, on the CPU), and the negative prompt's embedding is
    computed once (:meth:`negative_embedding`).
    """

    def __init__(self, encoder, tokenizer, config: TextEncoderConfig | None = None):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config or TextEncoderConfig()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._negative: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
        config: TextEncoderConfig | None = None,
    ) -> "UMT5TextEncoder":
        """Load from a local diffusers Wan folder (``text_encoder/`` + ``tokenizer/``) or one folder with both."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        encoder = UMT5EncoderModel.from_pretrained(
            _component_path(path, "text_encoder"), dtype=dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(_component_path(path, "tokenizer"), local_files_only=True)
        return cls(encoder, tokenizer, config).to(device)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.d_model

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> list[torch.Tensor]:
        device = next(self.encoder.parameters()).device
        tokens = self.tokenizer(
            [clean_prompt(c) for c in captions],
            padding="max_length",
            max_length=self.config.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        hidden = self.encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]

    def encode_unpadded(self, captions: list[str]) -> list[torch.Tensor]:
        """One ``[length_i, hidden]`` embedding per caption (on the CPU when cached)."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        fresh = dict(zip(missing, self._encode_uncached(missing))) if missing else {}
        out = []
        for caption in captions:
            if caption in self._cache:
                self._cache.move_to_end(caption)
                out.append(self._cache[caption])
            else:
                out.append(fresh[caption])
        if self.config.cache_size > 0:
            for caption, embedding in fresh.items():
                self._cache[caption] = embedding.cpu()
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return out

    def pad(self, embeddings: list[torch.Tensor], device=None) -> torch.Tensor:
        """Stack unpadded embeddings into ``[B, max_length, hidden]`` with zeros after each length."""
        device = device if device is not None else next(self.encoder.parameters()).device
        out = torch.zeros(len(embeddings), self.config.max_length, self.hidden_size, dtype=embeddings[0].dtype,
                          device=device)
        for i, e in enumerate(embeddings):
            out[i, : e.shape[0]] = e.to(device)
        return out

    def forward(self, captions: list[str] | str) -> torch.Tensor:
        """Captions -> ``[B, max_length, hidden]`` on the encoder's device."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        return self.pad(self.encode_unpadded(captions))

    encode = forward

    def negative_embedding(self, prompt: str = WAN_NEGATIVE_PROMPT) -> torch.Tensor:
        """``[1, max_length, hidden]`` embedding of the negative prompt, computed once per prompt."""
        if prompt not in self._negative:
            self._negative[prompt] = self.pad(self._encode_uncached([prompt]))
        return self._negative[prompt]

    def cache_info(self) -> dict:
        return {"entries": len(self._cache), "capacity": self.config.cache_size}
