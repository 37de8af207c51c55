"""One entry point for the training loop: a data config -> an endless loader of DiT inputs.

Both sources give the same batch::

    {"latent": [B, 16, T, H/8, W/8] float32, "text_embedding": [B, 512, 4096], "text_length": [B],
     "caption": list[str]}

and ``state_dict()`` / ``load_state_dict()`` for exact resume (store it in the training checkpoint, one
per DP rank).
"""

import os
from dataclasses import dataclass

import torch

from megatron_rcm.dtypes import to_torch

from .shapes import ShapesConfig
from .shards import latent_loader
from .video import video_loader


@dataclass
class DataConfig:
    """Where training batches come from: the `data` section of the training config, and the argument of
    `build_data_loader` for the file sources (the batch size and seed come from the `training` section)."""

    source: str = "shapes"
    """`shapes` (the procedural set of the tiny default, no files), `latents` (a shard folder from
    tools/preprocess_data.py or tools/generate_synthetic_data.py), `videos` (a JSONL video manifest, decoded by DALI
    and encoded online by the VAE and text encoder) or `random` (Gaussian latents of the Wan VAE's shape for
    `frames` x `height` x `width` and random text embeddings: scale probes)."""

    path: str = ""
    """The shard folder or the manifest (`latents` / `videos`)."""

    negative_text_embedding: str = ""
    """`latents` / `videos`: a .pt or .safetensors file holding the negative prompt's embedding `[L, text_dim]`
    (tools/encode_negative_prompt.py writes one)."""

    text_length: int = 512
    """`random`: text tokens per sample (UMT5 in Wan: 512)."""

    frames: int = 8
    """Video frames (shapes: pixel frames; videos / random: decoded frames, 4k + 1 for Wan's VAE)."""

    stride: int = 1
    """`videos`: source frames between clip frames."""

    height: int = 480
    width: int = 832
    """`videos` / `random`: frame size."""

    size: int = 16
    """`shapes`: height = width in pixels."""

    radius: int = 3
    """`shapes`: half-size of a shape."""

    speed: int = 1
    """`shapes`: pixels per frame."""

    model: str = ""
    """`videos`: local diffusers Wan folder with `vae/`, `text_encoder/`, `tokenizer/`."""

    encoder_dtype: str = "bfloat16"
    """`videos`: compute dtype of the VAE and text encoder."""

    text_cache_size: int = 4096
    """`videos`: captions whose embeddings are kept (see `TextEncoderConfig`)."""

    def shapes(self) -> ShapesConfig:
        return ShapesConfig(frames=self.frames, size=self.size, radius=self.radius, speed=self.speed)


class EncodedVideoLoader:
    """A :class:`~megatron_rcm.data.video.VideoLoader` followed by the frozen VAE and text encoder."""

    def __init__(self, videos, vae, text_encoder):
        self.videos, self.vae, self.text_encoder = videos, vae, text_encoder

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def num_skipped(self) -> int:
        return self.videos.num_skipped

    def __next__(self) -> dict:
        batch = next(self.videos)
        unpadded = self.text_encoder.encode_unpadded(batch["caption"])
        device = batch["video"].device
        return {
            "latent": self.vae.encode(batch["video"]).to(device),
            "text_embedding": self.text_encoder.pad(unpadded, device=device).float(),
            "text_length": torch.tensor([e.shape[0] for e in unpadded], dtype=torch.int64),
            "caption": batch["caption"],
        }

    def state_dict(self) -> dict:
        return self.videos.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.videos.load_state_dict(state)


def build_data_loader(config: DataConfig, *, batch_size: int = 1, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                      device=None):
    """The loader of a file source (`latents`, `videos`) for one data-parallel rank (TP / CP / PP ranks pass their
    DP rank): `batch_size` samples per micro-batch on this rank; `seed` orders the samples."""
    if not config.path:
        raise ValueError("data config: 'path' is empty (a latent shard folder or a video manifest)")
    if config.source == "latents":
        return latent_loader(config.path, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                             seed=seed, device=device or "cpu")
    if config.source == "videos":
        from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder, WanVAE

        if not config.model or not os.path.isdir(config.model):
            raise FileNotFoundError(f"data config: 'model' must be a local Wan folder (vae/, text_encoder/, "
                                    f"tokenizer/) for online encoding, got {config.model!r}")
        dtype = to_torch(config.encoder_dtype)
        videos = video_loader(config.path, frames=config.frames, stride=config.stride, height=config.height,
                              width=config.width, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                              seed=seed, device=device)
        vae = WanVAE.from_pretrained(config.model, dtype=dtype, device=videos.device)
        text_encoder = UMT5TextEncoder.from_pretrained(
            config.model, dtype=dtype, device=videos.device, config=TextEncoderConfig(cache_size=config.text_cache_size)
        )
        return EncodedVideoLoader(videos, vae, text_encoder)
    raise ValueError(f"data config: unknown source {config.source!r} (expected 'latents' or 'videos'; 'shapes' and "
                     f"'random' are built by the trainer)")
