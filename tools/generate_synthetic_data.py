#!/usr/bin/env python
"""Sample the teacher on a list of prompts and write the samples as latent shards.

The shards have the format of tools/preprocess_data.py (source "teacher" in meta.json), so training reads
them with ``megatron_rcm.data.latent_loader`` exactly like encoded real videos. The defaults are the rCM
reference's synthetic data for Wan2.1-1.3B: Euler, 100 steps, flow shift 3, guidance 5, 832x480x81
(latents [16, 21, 60, 104]), Wan's default negative prompt.

Examples:
    python tools/generate_synthetic_data.py --prompts prompts.txt --teacher Wan2.1-T2V-1.3B-Diffusers \\
        --output shards/teacher-480p

    # 8 GPUs: each rank samples every 8th shard with a full copy of the teacher; re-run to resume
    torchrun --nproc-per-node 8 tools/generate_synthetic_data.py --prompts prompts.jsonl \\
        --teacher Wan2.1-T2V-1.3B-Diffusers --output shards/teacher-480p
"""

import argparse
import logging
import os
import sys

import torch

from megatron_rcm.data import RESOLUTION_BUCKETS  # (height, width)
from megatron_rcm.dtypes import canonical, to_torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Sample i uses prompt i and noise seeded by (--seed, i): the output does not depend on the number "
        "of ranks or on restarts. Shard s holds prompts [s*S, (s+1)*S) and is written by rank s %% WORLD_SIZE "
        "to a temporary name first; running the same command again only does the missing shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompts", required=True,
                   help="prompt file: .txt (one prompt per line) or .jsonl ('caption' / 'text' / 'prompt' key)")
    p.add_argument("--teacher", required=True,
                   help="local teacher DiT: a diffusers Wan2.1 pipeline folder, its transformer/ folder, an original "
                   "Wan-AI release or a megatron-rcm checkpoint")
    p.add_argument("--text-encoder", help="local folder with the UMT5 encoder + tokenizer, or a Wan pipeline folder "
                   "(default: --teacher, which then must be a pipeline folder)")
    p.add_argument("--output", required=True, help="shard folder (created; an existing one is resumed)")
    p.add_argument("--bucket", choices=sorted(RESOLUTION_BUCKETS),
                   help="resolution bucket: 480p = 832x480, 720p = 1280x720, tiny = 64x64 (overrides --height/--width)")
    p.add_argument("--height", type=int, default=480, help="video height in pixels (latent: /8; default 480)")
    p.add_argument("--width", type=int, default=832, help="video width in pixels (latent: /8; default 832)")
    p.add_argument("--frames", type=int, default=81, help="video frames, 4k+1 (latent: 1 + (F-1)/4; default 81)")
    p.add_argument("--steps", type=int, default=100, help="teacher ODE steps (default 100)")
    p.add_argument("--solver", default="euler", choices=["euler", "unipc"], help="teacher ODE solver (default euler)")
    p.add_argument("--shift", type=float, default=3.0, help="flow shift of the time grid (default 3)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale; 1 disables the "
                   "unconditional branch (default 5)")
    p.add_argument("--negative-prompt", default=None, help="unconditional prompt (default: Wan's negative prompt)")
    p.add_argument("--samples-per-shard", type=int, default=16, help="samples per shard (default 16)")
    p.add_argument("--batch-size", type=int, default=1, help="samples the teacher denoises together (default 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--dtype", default="bfloat16", type=canonical, choices=["bfloat16", "float16", "float32"],
                   help="teacher / text encoder compute dtype (default bfloat16; the ODE state is float64)")
    p.add_argument("--latent-dtype", default="bfloat16", type=canonical, choices=["bfloat16", "float16", "float32"],
                   help="storage dtype of the samples and text embeddings (default bfloat16)")
    p.add_argument("--max-text-length", type=int, default=512, help="text tokens (Wan: 512)")
    p.add_argument("--device", default=None, help="cuda / cuda:N / cpu (default: cuda:LOCAL_RANK if a GPU is present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.bucket:
        args.height, args.width = RESOLUTION_BUCKETS[args.bucket]
    if (args.frames - 1) % 4 or args.height % 8 or args.width % 8:
        p.error("--frames must be 4k+1 and --height/--width multiples of 8 (Wan's VAE)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_rcm.data.synthetic import SyntheticConfig, generate_teacher_shards, read_prompts
    from megatron_rcm.diffusion import TrigFlowWrapper
    from megatron_rcm.models import from_pretrained
    from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder

    device = args.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dtype = to_torch(args.dtype)
    prompts = read_prompts(args.prompts)
    net = from_pretrained(args.teacher, params_dtype=dtype, device=device).eval()
    teacher = TrigFlowWrapper(net, timestep_scale=net.config.timestep_scale)
    text_encoder = UMT5TextEncoder.from_pretrained(
        args.text_encoder or args.teacher, dtype=dtype, device=device,
        config=TextEncoderConfig(max_length=args.max_text_length, cache_size=0),
    )
    if torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    config = SyntheticConfig(
        output=args.output,
        latent_shape=(net.config.in_channels, 1 + (args.frames - 1) // 4, args.height // 8, args.width // 8),
        num_steps=args.steps, shift=args.shift, guidance=args.guidance, solver=args.solver,
        negative_prompt=args.negative_prompt, samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
        seed=args.seed, latent_dtype=args.latent_dtype, rank=rank, world_size=world, progress=not args.no_progress,
    )
    counts = generate_teacher_shards(config, prompts, teacher, text_encoder, device)
    print(f"rank {rank}/{world}: {counts}", file=sys.stderr)
    return counts


if __name__ == "__main__":
    main()
