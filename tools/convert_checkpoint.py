#!/usr/bin/env python3
"""Convert DiT checkpoints between Hugging Face diffusers format and megatron-rcm (megatron-core
dist_checkpointing) format. Runs on a CPU-only machine, in one process; memory ~ the checkpoint's size.

  python tools/convert_checkpoint.py hf-to-mcore --model wan --input Wan2.1-T2V-1.3B-Diffusers --output ckpt/wan13b
  python tools/convert_checkpoint.py mcore-to-hf --model wan --input ckpt/wan13b --output wan13b-hf

`hf-to-mcore` accepts a diffusers model folder, a diffusers pipeline folder (its transformer/ is used), an
original Wan-AI release folder (Wan-Video/Wan2.1 key names) or an original Cosmos-Predict2 release folder
(`model.pt`, with `--preset cosmos-predict2-2b-t2i` or another Cosmos preset naming its architecture). The megatron checkpoint loads at any tensor-parallel
size. `mcore-to-hf` writes config.json + safetensors that `WanTransformer3DModel.from_pretrained` loads. Outputs are
written to a side directory and renamed into place at the end: a failed conversion leaves no output behind.
"""

import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

import torch  # noqa: E402

from megatron_rcm.checkpoint import hf, io  # noqa: E402
from megatron_rcm.checkpoint.sharding import check_state_dict  # noqa: E402
from megatron_rcm.models import loading  # noqa: E402
from megatron_rcm.parallel import destroy_parallel, initialize_parallel  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _meta_model(arch, config):
    with torch.device("meta"):
        return arch.model_cls(config, params_dtype=torch.float32, perform_initialization=False)


def hf_to_mcore(args) -> None:
    arch, config, kind, directory = loading.inspect_checkpoint(args.input, args.model, args.preset)
    if kind == "megatron":
        raise ValueError(f"{args.input} is already a megatron-rcm checkpoint")
    print(f"reading {kind} {arch.name} checkpoint from {directory}", flush=True)
    sd = loading.read_full_state_dict(arch, config, kind, directory)
    check_state_dict(_meta_model(arch, config), sd, f"checkpoint {directory}")
    if args.dtype:
        sd = {k: v.to(DTYPES[args.dtype]) for k, v in sd.items()}
    dtypes = sorted({str(v.dtype) for v in sd.values()})
    print(f"writing {len(sd)} tensors ({sum(v.numel() for v in sd.values()):,} parameters, {dtypes}) to "
          f"{args.output}", flush=True)
    io.save_full(sd, args.output, {"model": arch.name, "config": loading.config_to_dict(config),
                                   "params_dtype": dtypes[0] if len(dtypes) == 1 else "mixed"})


def mcore_to_hf(args) -> None:
    arch, config, kind, directory = loading.inspect_checkpoint(args.input, args.model)
    if kind != "megatron":
        raise ValueError(f"{args.input} is a {kind} checkpoint, not a megatron-rcm one ({io.HEADER} missing)")
    print(f"reading megatron-rcm {arch.name} checkpoint from {directory}", flush=True)
    shapes = io.tensor_shapes(directory)
    check_state_dict(_meta_model(arch, config), {k: torch.empty(s, device="meta") for k, s in shapes.items()},
                     f"checkpoint {directory}")
    sd = io.load_full(directory)
    out = arch.mcore_to_hf(sd, config)
    if args.dtype:
        out = {k: v.to(DTYPES[args.dtype]) for k, v in out.items()}
    print(f"writing {len(out)} tensors to {args.output}", flush=True)
    tmp = io.atomic_dir(args.output)
    hf.write_model_dir(tmp, out, config.to_diffusers())
    io.commit_dir(tmp, args.output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("hf-to-mcore", "diffusers / original release -> megatron-rcm"),
                        ("mcore-to-hf", "megatron-rcm -> diffusers")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", required=True, choices=sorted(loading.ARCHITECTURES), help="model family")
        p.add_argument("--input", required=True, help="source checkpoint directory")
        p.add_argument("--output", required=True, help="destination directory (must not exist unless --overwrite)")
        p.add_argument("--dtype", choices=sorted(DTYPES), help="cast every tensor (default: keep stored dtypes)")
        p.add_argument("--preset", help="architecture of an original Cosmos-Predict2 release (model.pt has no "
                                         "config), e.g. cosmos-predict2-2b-t2i")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f"output {args.output} exists (pass --overwrite to replace it)")
    start = time.time()
    initialize_parallel()
    try:
        {"hf-to-mcore": hf_to_mcore, "mcore-to-hf": mcore_to_hf}[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    print(f"done in {time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
