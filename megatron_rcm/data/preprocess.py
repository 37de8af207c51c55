"""Videos + captions -> shards of precomputed latents and text embeddings (the library side of
``tools/preprocess_data.py``).

Shard ``i`` holds manifest rows ``[i * samples_per_shard, (i + 1) * samples_per_shard)`` (minus the
skipped videos) and is written by rank ``i % world_size``: the assignment depends only on the manifest,
so a crashed or re-launched run (any world size) skips the shards that exist and redoes the rest.
"""

import json
import logging
import math
import os
from dataclasses import dataclass

import torch

from .manifest import read_manifest
from .shards import ShardMeta, shard_name, write_meta, write_shard
from .video import NoUsableVideos, VideoLoader, VideoLoaderConfig

logger = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    """One preprocessing run."""

    manifest: str
    """JSONL manifest of videos and captions."""

    output: str
    """Shard folder (created); re-running with the same folder resumes."""

    frames: int = 81
    """Frames per clip (4k + 1 for Wan's VAE); the clip starts at the video's first frame."""

    stride: int = 1
    """Source frames between clip frames."""

    height: int = 480
    width: int = 832

    samples_per_shard: int = 64
    batch_size: int = 1
    """Clips encoded together by the VAE."""

    latent_dtype: str = "bfloat16"
    """Storage dtype of latents and text embeddings."""

    rank: int = 0
    world_size: int = 1

    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""


def _usable_clips(loader: VideoLoader, wanted: set[int]):
    """Yield ``(index, clip, caption)`` once for each manifest row of ``wanted`` that decodes."""
    seen: set[int] = set()
    while (wanted & loader.usable_indices) - seen:
        batch = next(loader)
        for i, index in enumerate(batch["index"].tolist()):
            if index in seen or index not in wanted:
                continue
            seen.add(index)
            yield index, batch["video"][i], batch["caption"][i]


def preprocess(config: PreprocessConfig, vae, text_encoder, device=None) -> dict:
    """Encode this rank's shards; returns counts ``{"written", "existing", "samples", "skipped"}``.

    ``vae`` is a :class:`~megatron_rcm.models.encoders.WanVAE`, ``text_encoder`` a
    :class:`~megatron_rcm.models.encoders.UMT5TextEncoder`.
    """
    from tqdm import tqdm

    entries = read_manifest(config.manifest)
    num_shards = math.ceil(len(entries) / config.samples_per_shard)
    store_dtype = getattr(torch, config.latent_dtype)
    meta = ShardMeta(
        latent_shape=list(vae.latent_shape(config.frames, config.height, config.width)),
        text_hidden=text_encoder.hidden_size,
        text_max_length=text_encoder.config.max_length,
        latent_dtype=config.latent_dtype,
        text_dtype=config.latent_dtype,
        source="videos",
        samples_per_shard=config.samples_per_shard,
        num_shards=num_shards,
        extra={"frames": config.frames, "stride": config.stride, "height": config.height, "width": config.width,
               "manifest_rows": len(entries)},
    )
    if config.rank == 0:
        write_meta(config.output, meta)
    os.makedirs(config.output, exist_ok=True)

    mine = list(range(config.rank, num_shards, config.world_size))
    counts = {"written": 0, "existing": 0, "samples": 0, "skipped": 0}
    skip_log = os.path.join(config.output, f"skipped-rank{config.rank:05d}.jsonl")
    bar = tqdm(mine, desc=f"shards (rank {config.rank})", unit="shard",
               disable=not config.progress or config.rank != 0)
    for shard in bar:
        path = os.path.join(config.output, shard_name(shard))
        if os.path.exists(path):  # finished by an earlier run
            counts["existing"] += 1
            continue
        rows = entries[shard * config.samples_per_shard : (shard + 1) * config.samples_per_shard]
        samples = []
        try:
            loader = VideoLoader(
                rows,
                VideoLoaderConfig(
                    frames=config.frames, stride=config.stride, height=config.height, width=config.width,
                    batch_size=config.batch_size, shuffle=False,
                    step=1 << 30,  # one clip per video, from its first frame
                ),
                device=device,
            )
        except NoUsableVideos as e:
            loader, skipped = None, e.skipped
        if loader is not None:
            # Encode as clips arrive: a shard of decoded 480p x 81-frame clips would not fit in memory.
            chunk = []
            for clip in _usable_clips(loader, {e.index for e in rows}):
                chunk.append(clip)
                if len(chunk) == config.batch_size:
                    samples += _encode(chunk, vae, text_encoder, entries, store_dtype)
                    chunk = []
            if chunk:
                samples += _encode(chunk, vae, text_encoder, entries, store_dtype)
            samples.sort(key=lambda sample: sample["key"])
            skipped = loader.skipped
        if skipped:
            with open(skip_log, "a", encoding="utf-8") as f:
                for p, reason in skipped:
                    f.write(json.dumps({"shard": shard, "path": p, "reason": reason}) + "\n")
        write_shard(path, samples)
        counts["written"] += 1
        counts["samples"] += len(samples)
        counts["skipped"] += len(skipped)
        bar.set_postfix(samples=counts["samples"], skipped=counts["skipped"])
    logger.info("preprocess rank %d: %s", config.rank, counts)
    return counts


def _encode(chunk, vae, text_encoder, entries, store_dtype) -> list[dict]:
    latents = vae.encode(torch.stack([clip for _, clip, _ in chunk]))
    texts = text_encoder.encode_unpadded([caption for _, _, caption in chunk])
    return [
        {
            "key": f"{index:09d}",
            "latent": latent.to(store_dtype),
            "text_embedding": text.to(store_dtype),
            "info": {"caption": caption, "index": index, "source": entries[index].path, "first_frame": 0},
        }
        for (index, _, caption), latent, text in zip(chunk, latents, texts)
    ]
