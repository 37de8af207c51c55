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

from .shards import latent_loader
from .video import video_loader


@dataclass
class DataConfig:
    """Where training batches come from."""

    source: str = "latents"
    """``latents``: a shard folder from tools/preprocess_data.py or tools/generate_synthetic_data.py;
    ``videos``: a JSONL video manifest, decoded by DALI and encoded online by the VAE and text encoder."""

    path: str = ""
    """The shard folder or the manifest."""

    batch_size: int = 1
    """Samples per micro-batch on one DP rank."""

    seed: int = 0

    # -- videos only --------------------------------------------------------------------------------
    model: str = ""
    """Local diffusers Wan folder with ``vae/``, ``text_encoder/``, ``tokenizer/`` (videos only)."""

    frames: int = 81
    stride: int = 1
    height: int = 480
    width: int = 832
    encoder_dtype: str = "bfloat16"
    """Compute dtype of the VAE and text encoder."""

    text_cache_size: int = 4096
    """Captions whose embeddings are kept (see ``TextEncoderConfig``)."""


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


def build_data_loader(config: DataConfig, *, dp_rank: int = 0, dp_size: int = 1, device=None):
    """The loader of ``config`` for one data-parallel rank (TP / CP / PP ranks pass their DP rank)."""
    if not config.path:
        raise ValueError("data config: 'path' is empty (a latent shard folder or a video manifest)")
    if config.source == "latents":
        return latent_loader(config.path, batch_size=config.batch_size, dp_rank=dp_rank, dp_size=dp_size,
                             seed=config.seed, device=device or "cpu")
    if config.source == "videos":
        from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder, WanVAE

        if not config.model or not os.path.isdir(config.model):
            raise FileNotFoundError(f"data config: 'model' must be a local Wan folder (vae/, text_encoder/, "
                                    f"tokenizer/) for online encoding, got {config.model!r}")
        dtype = getattr(torch, config.encoder_dtype)
        videos = video_loader(config.path, frames=config.frames, stride=config.stride, height=config.height,
                              width=config.width, batch_size=config.batch_size, dp_rank=dp_rank, dp_size=dp_size,
                              seed=config.seed, device=device)
        vae = WanVAE.from_pretrained(config.model, dtype=dtype, device=videos.device)
        text_encoder = UMT5TextEncoder.from_pretrained(
            config.model, dtype=dtype, device=videos.device, config=TextEncoderConfig(cache_size=config.text_cache_size)
        )
        return EncodedVideoLoader(videos, vae, text_encoder)
    raise ValueError(f"data config: unknown source {config.source!r} (expected 'latents' or 'videos')")
