#!/usr/bin/env python
"""Encode videos + captions once into shards of Wan latents and UMT5 text embeddings.

Training from the shards (``megatron_rcm.data.latent_loader``) skips video decoding, the VAE and the
text encoder at every step.

Examples:
    # one process
    python tools/preprocess_data.py --manifest videos.jsonl --model Wan2.1-T2V-1.3B-Diffusers \\
        --output shards/480p --bucket 480p --frames 81

    # 8 GPUs of one node: each rank writes every 8th shard; re-run the same command after a crash
    torchrun --nproc-per-node 8 tools/preprocess_data.py --manifest videos.jsonl \\
        --model Wan2.1-T2V-1.3B-Diffusers --output shards/480p --bucket 480p
"""

import argparse
import logging
import os
import sys

import torch

from megatron_rcm.data import RESOLUTION_BUCKETS as BUCKETS  # (height, width)
from megatron_rcm.dtypes import canonical, to_torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Output: OUTPUT/meta.json (sample shapes, dtypes, provenance), OUTPUT/shard-NNNNNN.tar "
        "(webdataset-style: <key>.safetensors with 'latent' [16, 1+(F-1)/4, H/8, W/8] and 'text_embedding' "
        "[tokens, 4096] unpadded, <key>.json with the caption and source), OUTPUT/shard-NNNNNN.idx.json "
        "(member offsets) and OUTPUT/skipped-rankNNNNN.jsonl (videos that could not be used, with the reason). "
        "Shard i holds manifest rows [i*S, (i+1)*S) and is written by rank i %% WORLD_SIZE, to a temporary "
        "name first: running the same command again (any number of ranks) only does the missing shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--manifest", required=True,
                   help="JSONL file, one {\"path\", \"caption\"[, \"fps\", \"num_frames\"]} per line; relative "
                   "paths are resolved against the manifest's folder")
    p.add_argument("--output", required=True, help="shard folder (created; an existing one is resumed)")
    p.add_argument("--model", help="local diffusers Wan2.1 folder holding vae/, text_encoder/ and tokenizer/")
    p.add_argument("--vae", help="local AutoencoderKLWan folder (default: MODEL/vae)")
    p.add_argument("--text-encoder", help="local folder with the UMT5 encoder and its tokenizer, or a Wan folder "
                   "(default: MODEL)")
    p.add_argument("--bucket", choices=sorted(BUCKETS), help="resolution bucket: 480p = 832x480, "
                   "720p = 1280x720, tiny = 64x64 (overrides --height/--width)")
    p.add_argument("--height", type=int, default=480, help="clip height after resize + centre crop (default 480)")
    p.add_argument("--width", type=int, default=832, help="clip width after resize + centre crop (default 832)")
    p.add_argument("--frames", type=int, default=81, help="frames per clip, 4k+1 (default 81); the clip starts "
                   "at frame 0, videos shorter than frames*stride are skipped")
    p.add_argument("--stride", type=int, default=1, help="source frames between clip frames (default 1)")
    p.add_argument("--samples-per-shard", type=int, default=64, help="videos per shard (default 64)")
    p.add_argument("--batch-size", type=int, default=1, help="clips the VAE encodes at once (default 1)")
    p.add_argument("--dtype", default="bfloat16", type=canonical, choices=["bfloat16", "float16", "float32"],
                   help="compute dtype of the VAE and text encoder (default bfloat16)")
    p.add_argument("--latent-dtype", default="bfloat16", type=canonical, choices=["bfloat16", "float16", "float32"],
                   help="storage dtype of latents and embeddings (default bfloat16)")
    p.add_argument("--max-text-length", type=int, default=512, help="text tokens (Wan: 512)")
    p.add_argument("--device", default=None, help="cuda / cuda:N / cpu (default: cuda:LOCAL_RANK if a GPU "
                   "is present, else cpu; CPU decoding handles VP8/VP9/MJPEG only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.bucket:
        args.height, args.width = BUCKETS[args.bucket]
    if not (args.model or (args.vae and args.text_encoder)):
        p.error("give --model, or both --vae and --text-encoder")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_rcm.data.preprocess import PreprocessConfig, preprocess
    from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder, WanVAE

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dtype = to_torch(args.dtype)
    vae = WanVAE.from_pretrained(args.vae or args.model, dtype=dtype, device=device)
    text_encoder = UMT5TextEncoder.from_pretrained(
        args.text_encoder or args.model, dtype=dtype, device=device,
        config=TextEncoderConfig(max_length=args.max_text_length, cache_size=0),
    )
    config = PreprocessConfig(
        manifest=args.manifest, output=args.output, frames=args.frames, stride=args.stride, height=args.height,
        width=args.width, samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
        latent_dtype=args.latent_dtype, rank=rank, world_size=world, progress=not args.no_progress,
    )
    counts = preprocess(config, vae, text_encoder, device=device)
    print(f"rank {rank}/{world}: {counts}", file=sys.stderr)
    return counts


if __name__ == "__main__":
    main()
