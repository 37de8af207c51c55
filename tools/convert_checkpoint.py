#!/usr/bin/env python3
"""Convert DiT checkpoints between Hugging Face diffusers format and megatron-rcm (megatron-core
dist_checkpointing) format. Runs on a CPU-only machine, in one process; memory ~ the checkpoint's size.

  python tools/convert_checkpoint.py hf-to-mcore --model wan --input Wan2.1-T2V-1.3B-Diffusers --output ckpt/wan13b
  python tools/convert_checkpoint.py mcore-to-hf --model wan --input runs/wan-rcm --output wan13b-rcm \\
      --base-pipeline Wan2.1-T2V-1.3B-Diffusers
  python tools/convert_checkpoint.py mcore-to-hf --model wan --input rCM_Wan2.1_T2V_1.3B_480p.pt --output rcm-hf

`hf-to-mcore` accepts a diffusers model folder, a diffusers pipeline folder (its transformer/ is used), an
original Wan-AI release folder (Wan-Video/Wan2.1 key names), an original Cosmos-Predict2 release folder
(`model.pt`, with `--preset cosmos-predict2-2b-t2i` or another Cosmos preset naming its architecture), or a `.pt` /
`.pth` file of the rCM reference implementation (a released student, `--ema` / `--net` picking its `net_ema.` /
`net.` tensors, or a teacher file). The megatron checkpoint loads at any tensor-parallel size.

`mcore-to-hf` reads a megatron-rcm model checkpoint (e.g. a run's `ema/`), a training run folder or one training
checkpoint (`--ema`, the default, or `--net` for the student; any parallel layout, no GPU needed), or an rCM
reference file, and writes a diffusers pipeline folder for Wan (`model_index.json`, `transformer/`, `scheduler/`
with the rCM student's times, the base pipeline's text encoder, tokenizer and VAE when `--base-pipeline` is a local
folder, else named in `model_index.json`, and a `README.md` model card); `--transformer-only` writes the
transformer folder alone (config.json + safetensors for `WanTransformer3DModel.from_pretrained`; Cosmos exports
are always that). Outputs are written to a side directory and renamed into place at the end: a failed
conversion leaves no output behind, and `--overwrite` replaces an older output only once the new one is complete.
Nothing is unpickled beyond tensors.
"""

import argparse
import os
import shlex
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

import torch  # noqa: E402

from megatron_rcm.checkpoint import io  # noqa: E402
from megatron_rcm.dtypes import ALIASES, DTYPES, canonical  # noqa: E402
from megatron_rcm.checkpoint.pipeline import PipelineExport  # noqa: E402
from megatron_rcm.checkpoint.sharding import check_state_dict  # noqa: E402
from megatron_rcm.diffusion.pipeline_scheduler import RCMScheduler  # noqa: E402
from megatron_rcm.models import loading  # noqa: E402
from megatron_rcm.parallel import destroy_parallel, initialize_parallel  # noqa: E402

# what an output we may replace with --overwrite looks like (anything else is someone's data)
OUTPUT_MARKERS = (io.HEADER, "config.json", "model_index.json")


class UsageError(ValueError):
    """A bad command line, reported before any file is read or written."""


def _meta_model(arch, config):
    with torch.device("meta"):
        return arch.model_cls(config, params_dtype=torch.float32, perform_initialization=False)


def _cast(sd, dtype):
    return {k: v.to(DTYPES[canonical(dtype)]) for k, v in sd.items()} if dtype else sd


def hf_to_mcore(args) -> None:
    arch, config, kind, directory = loading.inspect_checkpoint(args.input, args.model, args.preset, args.network)
    if kind == "megatron":
        raise ValueError(f"{args.input} is already a megatron-rcm checkpoint")
    print(f"reading {kind} {arch.name} checkpoint from {directory}", flush=True)
    sd = loading.read_full_state_dict(arch, config, kind, directory, args.network)
    check_state_dict(_meta_model(arch, config), sd, f"checkpoint {directory}")
    sd = _cast(sd, args.dtype)
    dtypes = sorted({str(v.dtype) for v in sd.values()})
    print(f"writing {len(sd)} tensors ({sum(v.numel() for v in sd.values()):,} parameters, {dtypes}) to "
          f"{args.output}", flush=True)
    io.save_full(sd, args.output, {"model": arch.name, "config": loading.config_to_dict(config),
                                   "params_dtype": dtypes[0] if len(dtypes) == 1 else "mixed"})


def _read_megatron(directory: str, arch, config) -> dict:
    try:
        shapes = io.tensor_shapes(directory)
    except Exception as e:  # a damaged checkpoint: say which one, not a traceback
        raise ValueError(f"checkpoint {directory} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    check_state_dict(_meta_model(arch, config), {k: torch.empty(s, device="meta") for k, s in shapes.items()},
                     f"checkpoint {directory}")
    try:
        return io.load_full(directory)
    except Exception as e:
        raise ValueError(f"checkpoint {directory} cannot be read ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def read_source(args):
    """(arch, config, full megatron-named state dict, model-card facts, sampler settings) of any export source."""
    card, sampler = {"source": args.input}, {}
    if loading.is_training_checkpoint(args.input):
        net = loading.read_training_network(args.input, "student" if args.network == "net" else "ema")
        if args.model and net.arch.name != args.model:
            raise ValueError(f"{args.input} holds a {net.arch.name} model, not {args.model}")
        rcm, model = net.run_config.get("rcm", {}), net.run_config.get("model", {})
        card.update(network="student" if args.network == "net" else "EMA", iterations=net.meta.get("iteration"),
                    dmd_weight=rcm.get("dmd_weight"), scm_weight=rcm.get("scm_weight"), teacher=model.get("teacher"),
                    command=net.meta.get("command"))
        sampler = {k: v for k, v in (("sigma_max", rcm.get("sigma_max")),
                                     ("mid_times", rcm.get("student_mid_times"))) if v is not None}
        print(f"reading the {card['network']} network of training checkpoint {net.directory}", flush=True)
        return net.arch, net.config, net.state_dict, card, sampler
    arch, config, kind, directory = loading.inspect_checkpoint(args.input, args.model, args.preset, args.network)
    print(f"reading {kind} {arch.name} checkpoint from {directory}", flush=True)
    if kind == "megatron":
        return arch, config, _read_megatron(directory, arch, config), card, sampler
    sd = loading.read_full_state_dict(arch, config, kind, directory, args.network)
    check_state_dict(_meta_model(arch, config), sd, f"checkpoint {directory}")
    return arch, config, sd, card, sampler


def mcore_to_hf(args) -> None:
    arch, config, sd, card, sampler = read_source(args)
    pipeline = None
    if arch.name != "wan" and not args.transformer_only:
        print(f"{arch.name}: pipeline export is implemented for Wan only; writing the transformer folder alone",
              flush=True)
    elif not args.transformer_only:
        sampler.update({k: v for k, v in (("sigma_max", args.sigma_max), ("mid_times", args.mid_times))
                        if v is not None})
        card["export_command"] = shlex.join(["python", "tools/convert_checkpoint.py", *args.argv])
        pipeline = PipelineExport(base_model=args.base_pipeline or "", link_components=args.link_components,
                                  num_train_timesteps=int(config.timestep_scale), card=card, **sampler)
    print(f"writing {len(sd)} tensors as a diffusers {'pipeline' if pipeline else 'model'} folder to "
          f"{args.output}", flush=True)
    dtype = DTYPES[canonical(args.dtype)] if args.dtype else None
    loading.write_diffusers(arch, config, sd, args.output, dtype, pipeline)


def check_paths(src: str, dst: str, overwrite: bool) -> None:
    """Refuse an output that is, contains or lies inside the input (after resolving symlinks and trailing
    slashes), and an existing output without --overwrite or that is not one of our outputs."""
    if not os.path.exists(src):
        raise UsageError(f"input {src} does not exist")
    a, b = os.path.realpath(src), os.path.realpath(dst)
    if a == b:
        raise UsageError(f"output {dst} is the input {src}: choose another output directory (the source is never "
                         f"replaced, even with --overwrite)")
    if os.path.commonpath([a, b]) == a:
        raise UsageError(f"output {dst} lies inside the input {src}: choose an output outside it")
    if os.path.commonpath([a, b]) == b:
        raise UsageError(f"input {src} lies inside the output {dst}: replacing the output would delete the input")
    if os.path.lexists(dst):
        if not overwrite:
            raise UsageError(f"output {dst} exists (pass --overwrite to replace it)")
        if not os.path.isdir(dst) or not any(os.path.isfile(os.path.join(dst, m)) for m in OUTPUT_MARKERS):
            raise UsageError(f"output {dst} exists and is not a checkpoint or diffusers folder ({', '.join(OUTPUT_MARKERS)}"
                             f"): refusing to replace it, even with --overwrite")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("hf-to-mcore", "diffusers / original release / rCM reference file -> megatron-rcm"),
                        ("mcore-to-hf", "megatron-rcm / training checkpoint / rCM reference file -> diffusers")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", required=True, choices=sorted(loading.ARCHITECTURES), help="model family")
        p.add_argument("--input", required=True, help="source checkpoint directory or rCM reference .pt/.pth file")
        p.add_argument("--output", required=True, help="destination directory (must not exist unless --overwrite)")
        p.add_argument("--dtype", choices=sorted(DTYPES) + sorted(a for a in ALIASES if ALIASES[a] != "float64"),
                       help="cast every tensor, e.g. bf16 or bfloat16 (default: keep stored dtypes)")
        p.add_argument("--preset", help="architecture of an original Cosmos-Predict2 release (model.pt has no "
                                         "config), e.g. cosmos-predict2-2b-t2i, or of an rCM reference file")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing output (only once the new one is complete)")
        which = p.add_mutually_exclusive_group()
        which.add_argument("--ema", dest="network", action="store_const", const="ema",
                           help="the EMA network (rCM reference net_ema.*, training checkpoints; the default)")
        which.add_argument("--net", dest="network", action="store_const", const="net",
                           help="the trained network (rCM reference net.*, a training checkpoint's student)")
        if name == "mcore-to-hf":
            p.add_argument("--transformer-only", action="store_true",
                           help="write the transformer folder alone (config.json + safetensors), no pipeline")
            p.add_argument("--base-pipeline", help="the base diffusers Wan pipeline: a local folder (its text "
                                                   "encoder, tokenizer and VAE are copied) or a Hub name (recorded)")
            p.add_argument("--link-components", action="store_true",
                           help="symlink the local base pipeline's components instead of copying them")
            p.add_argument("--sigma-max", type=float, help="student sampler's initial sigma (default: the run's, 80)")
            p.add_argument("--mid-times", type=float, nargs="+",
                           help="student sampler's intermediate TrigFlow times (default: the run's, 1.3 1.0 0.6)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv  # for the model card
    try:
        check_paths(args.input, args.output, args.overwrite)
        if args.command == "mcore-to-hf":
            if args.link_components and not args.base_pipeline:
                raise UsageError("--link-components needs --base-pipeline (a local pipeline folder)")
            if args.sigma_max is not None or args.mid_times is not None:
                try:
                    RCMScheduler(**{k: v for k, v in (("sigma_max", args.sigma_max), ("mid_times", args.mid_times))
                                    if v is not None})
                except ValueError as e:
                    raise UsageError(f"--sigma-max / --mid-times: {e}") from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.time()
    initialize_parallel()
    try:
        {"hf-to-mcore": hf_to_mcore, "mcore-to-hf": mcore_to_hf}[args.command](args)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    print(f"done in {time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
