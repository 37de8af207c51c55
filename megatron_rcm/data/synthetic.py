"""Teacher-generated training data: prompts -> teacher ODE samples, written as latent shards.

rCM's reference trained Wan2.1-1.3B on teacher videos (Euler, 100 steps, shift 3, CFG 5, 832x480x81).
The samples stay in the teacher's (normalised) latent space, so the shards have the same format as
``tools/preprocess_data.py`` writes and :func:`~megatron_rcm.data.latent_loader` reads them alike.

Sample ``i`` uses prompt ``i`` and noise drawn from a generator seeded by ``(seed, i)``: the data does not
depend on the number of ranks or on restarts, and shard ``s`` (prompts ``[s*S, (s+1)*S)``) is written by
rank ``s % world_size`` like preprocessing does.
"""

import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import torch

from .shards import ShardMeta, shard_name, write_meta, write_shard

logger = logging.getLogger(__name__)


@dataclass
class SyntheticConfig:
    """One teacher-sampling run (defaults: the rCM reference's Wan2.1-1.3B data)."""

    output: str
    """Shard folder (created; re-running with the same folder resumes)."""

    latent_shape: tuple[int, int, int, int]
    """``(C, T, H, W)`` of a sample: Wan 480p x 81 frames is ``(16, 21, 60, 104)``."""

    num_steps: int = 100
    shift: float = 3.0
    guidance: float = 5.0
    solver: str = "euler"
    """``euler`` (the reference's) or ``unipc``."""

    negative_prompt: str | None = None
    """Prompt of the unconditional branch; None: Wan's default negative prompt."""

    samples_per_shard: int = 16
    batch_size: int = 1
    seed: int = 0
    latent_dtype: str = "bfloat16"
    rank: int = 0
    world_size: int = 1
    progress: bool = True


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file (``caption`` / ``text`` / ``prompt`` key)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path!r}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                record = json.loads(line)
                prompt = next((record[k] for k in ("caption", "text", "prompt") if k in record), None)
                if prompt is None:
                    raise ValueError(f"{path}:{lineno}: no 'caption', 'text' or 'prompt' key")
                prompts.append(str(prompt))
            else:
                prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return prompts


def sample_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """The initial noise of sample ``index`` (float32, CPU): fixed by ``(seed, index)`` alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def generate_teacher_shards(config: SyntheticConfig, prompts: list[str], teacher, text_encoder, device) -> dict:
    """Sample the teacher for this rank's shards; returns ``{"written", "existing", "samples"}``.

    ``teacher`` is a :class:`~megatron_rcm.diffusion.TrigFlowWrapper` around the teacher DiT,
    ``text_encoder`` a :class:`~megatron_rcm.models.encoders.UMT5TextEncoder`.
    """
    from tqdm import tqdm

    from megatron_rcm.diffusion import teacher_sample
    from megatron_rcm.models.encoders import WAN_NEGATIVE_PROMPT

    num_shards = math.ceil(len(prompts) / config.samples_per_shard)
    store_dtype = getattr(torch, config.latent_dtype)
    negative_prompt = config.negative_prompt if config.negative_prompt is not None else WAN_NEGATIVE_PROMPT
    provenance = {k: v for k, v in asdict(config).items() if k in ("num_steps", "shift", "guidance", "solver", "seed")}
    meta = ShardMeta(
        latent_shape=list(config.latent_shape),
        text_hidden=text_encoder.hidden_size,
        text_max_length=text_encoder.config.max_length,
        latent_dtype=config.latent_dtype,
        text_dtype=config.latent_dtype,
        source="teacher",
        samples_per_shard=config.samples_per_shard,
        num_shards=num_shards,
        extra={**provenance, "negative_prompt": negative_prompt, "num_prompts": len(prompts)},
    )
    if config.rank == 0:
        write_meta(config.output, meta)
    os.makedirs(config.output, exist_ok=True)

    negative = None
    if config.guidance != 1.0:
        negative = text_encoder.negative_embedding(negative_prompt).to(device, teacher.dtype)
    counts = {"written": 0, "existing": 0, "samples": 0}
    mine = list(range(config.rank, num_shards, config.world_size))
    bar = tqdm(mine, desc=f"teacher shards (rank {config.rank})", unit="shard",
               disable=not config.progress or config.rank != 0)
    for shard in bar:
        path = os.path.join(config.output, shard_name(shard))
        if os.path.exists(path):
            counts["existing"] += 1
            continue
        first = shard * config.samples_per_shard
        indices = list(range(first, min(first + config.samples_per_shard, len(prompts))))
        samples = []
        for start in range(0, len(indices), config.batch_size):
            chunk = indices[start : start + config.batch_size]
            chunk_prompts = [prompts[i] for i in chunk]
            unpadded = text_encoder.encode_unpadded(chunk_prompts)
            text = text_encoder.pad(unpadded, device=device).to(teacher.dtype)
            noise = torch.stack([sample_noise(tuple(config.latent_shape), config.seed, i) for i in chunk]).to(device)
            latents = teacher_sample(
                teacher, noise, text, config.num_steps, solver=config.solver, shift=config.shift,
                guidance=config.guidance, neg_text=negative,
            )
            for i, prompt, latent, embedding in zip(chunk, chunk_prompts, latents, unpadded):
                samples.append({
                    "key": f"{i:09d}",
                    "latent": latent.to(store_dtype),
                    "text_embedding": embedding.to(store_dtype),
                    "info": {"caption": prompt, "index": i, "source": "teacher", "noise_seed": [config.seed, i]},
                })
        write_shard(path, samples)
        counts["written"] += 1
        counts["samples"] += len(samples)
        bar.set_postfix(samples=counts["samples"])
    logger.info("teacher sampling rank %d: %s", config.rank, counts)
    return counts
