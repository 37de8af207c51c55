#!/usr/bin/env python3
"""Write the negative prompt's text embedding, the file `data.negative_text_embedding` names (the unconditional
branch of the teacher's classifier-free guidance when training from latent shards or videos).

  python tools/encode_negative_prompt.py --text-encoder Wan2.1-T2V-1.3B-Diffusers --output neg.pt
  python tools/encode_negative_prompt.py --text-encoder Wan2.1-T2V-1.3B-Diffusers --output neg.safetensors

`--text-encoder` is a local diffusers Wan pipeline folder (or one folder with the UMT5 encoder and its tokenizer);
nothing is downloaded. The embedding is `[max_length, hidden]` (Wan: 512 x 4096), zero past the prompt's tokens, as
the trainer's own text encoder pads captions. A `.pt` output is one tensor saved with `torch.save` (what the
trainer and the rCM reference's `neg_embed_path` load: a tensor, so `torch.load(..., weights_only=True)` reads it);
a `.safetensors` output holds it under the key `negative_text_embedding`
(`megatron_rcm.checkpoint.negative_prompt.load_negative_embedding` reads both). Default prompt: Wan2.1's negative prompt.
"""

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

import torch  # noqa: E402

from megatron_rcm.checkpoint.negative_prompt import save_negative_embedding  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    from megatron_rcm.models.encoders import WAN_NEGATIVE_PROMPT

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-encoder", required=True, help="local Wan pipeline folder (text_encoder/ + tokenizer/)")
    p.add_argument("--output", required=True, help="output file: .pt (a tensor) or .safetensors")
    p.add_argument("--prompt", default=WAN_NEGATIVE_PROMPT, help="the negative prompt (default: Wan2.1's)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per caption, as in training (Wan: 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the encoder and of the stored embedding (the trainer casts it to float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def encode(text_encoder: str, prompt: str, max_length: int, dtype: torch.dtype) -> torch.Tensor:
    """`[max_length, hidden]` embedding of `prompt`, padded with zeros like the trainer's captions."""
    from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder

    encoder = UMT5TextEncoder.from_pretrained(text_encoder, dtype=dtype,
                                              config=TextEncoderConfig(max_length=max_length, cache_size=0))
    return encoder.negative_embedding(prompt)[0].to(dtype).contiguous()


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = []
    if not args.output.endswith((".pt", ".safetensors")):
        problems.append(f"--output {args.output} must end in .pt or .safetensors")
    if os.path.exists(args.output) and not args.overwrite:
        problems.append(f"--output {args.output} exists (pass --overwrite to replace it)")
    if args.max_length < 1:
        problems.append(f"--max-length must be >= 1, got {args.max_length}")
    if not args.prompt.strip():
        problems.append("--prompt is empty")
    if not os.path.isdir(args.text_encoder):
        problems.append(f"--text-encoder {args.text_encoder} is not a local folder (nothing is downloaded)")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        embedding = encode(args.text_encoder, args.prompt, args.max_length, DTYPES[args.dtype])
    except (OSError, ValueError) as e:
        print(f"error: --text-encoder {args.text_encoder}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    save_negative_embedding(embedding, args.output)
    print(f"wrote {tuple(embedding.shape)} {embedding.dtype} embedding of the negative prompt to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
