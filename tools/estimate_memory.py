"""Estimate the per-GPU memory of an rCM run before starting it (no weights, no GPU; seconds on a login node).

    python tools/estimate_memory.py --config examples/configs/wan2.1-t2v-14b-480p.yaml --gpus 64
    python tools/estimate_memory.py --config examples/configs/wan2.1-t2v-1.3b-480p.yaml model.activation_checkpointing=false
    python tools/estimate_memory.py --config FILE [key=value ...] --gpu-memory 80GiB --json
    python tools/estimate_memory.py --probe --measure 6 training.micro_batch_size=2   # on a GPU: estimate vs measured

Prints the layout, the resident memory (weights of the four networks, EMA, gradients, optimizer state), the peak
activations of each pass, the peak per step kind (what torch.cuda.max_memory_allocated reports), a fits / does not
fit verdict per GPU size, and the smallest layouts that fit on the given number of GPUs. Without --gpu-memory the
verdicts are for 80 GB (H100 / A100) and 141 GB (H200) cards. `--json`: the same as one JSON object.
`--probe` starts from the scale probe's settings (Wan2.1-1.3B, 480p x 81, random weights and data, one micro-batch
per GPU); `--measure N` then also runs N real training iterations on this GPU and prints the measured peaks next to
the estimate (torch.cuda.max_memory_allocated; run under torchrun for several GPUs).
"""

import argparse
import json
import re
import sys

CARDS = {"80 GB": 79.2, "141 GB": 139.8}
"""Memory torch reports for the common cards, GiB (H100/A100 80GB, H200)."""


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '141G', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|G|MiB|MB)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"--gpu-memory: cannot read {text!r} (e.g. 80GiB, 141GB)")
    unit = (m.group(2) or "GiB").lower()
    return float(m.group(1)) * {"gib": 2**30, "g": 2**30, "gb": 1e9, "mib": 2**20, "mb": 1e6}[unit]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file (see examples/configs/); default: the tiny default")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_model_parallel_size=4")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs of the run (default: TP x CP x PP of the config, i.e. DP 1)")
    p.add_argument("--gpu-memory", type=parse_memory, default=None, help="memory of one GPU, e.g. 80GiB")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--brief", action="store_true", help="layout, peaks and verdicts only (job scripts)")
    p.add_argument("--probe", action="store_true", help="start from the scale probe's settings")
    p.add_argument("--measure", type=int, default=0, metavar="N",
                   help="also run N training iterations on this GPU and print the measured peaks")
    p.add_argument("--breakdown", action="store_true",
                   help="with --measure: list what is allocated at each step kind's peak, by the line of code that "
                        "allocated it (torch's allocation history of each kind's last iteration)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from megatron_rcm.training.console import quiet

    quiet()
    from megatron_rcm.training.config import ConfigError, load_config
    from megatron_rcm.training.memory import GiB, estimate, smallest_fitting

    overrides = list(args.overrides)
    if args.probe:
        from megatron_rcm.training.scale_probe import PROBE

        mb = [o.split("=", 1)[1] for o in overrides if o.startswith("training.micro_batch_size=")] or ["1"]
        overrides = PROBE + ["run_dir=runs/memory-probe", f"training.global_batch_size={mb[-1]}"] + overrides
    try:
        config = load_config(args.config, overrides)
        p = config.parallel
        gpus = args.gpus or p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size
        est = estimate(config, gpus)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    cards = {f"{args.gpu_memory / GiB:.1f} GiB": args.gpu_memory / GiB} if args.gpu_memory else CARDS
    fitting = {name: smallest_fitting(config, gpus, gib * GiB) for name, gib in cards.items()}
    measured = _measure(config, args.measure, args.breakdown) if args.measure else None
    if args.json:
        out = est.to_dict(args.gpu_memory)
        if measured is not None:
            out["measured_peak_gib"] = measured
        out["gpus"] = gpus
        out["verdicts"] = {name: est.fits(gib * GiB) for name, gib in cards.items()}
        out["smallest_fitting"] = {name: [e.layout.overrides() for e in rows] for name, rows in fitting.items()}
        print(json.dumps(out, indent=1))
        return
    g = lambda b: f"{b / GiB:7.2f} GiB"
    lay = est.layout
    print(f"{config.model.preset} on {gpus} GPU(s): {lay.describe()}")
    print(f"  global batch {config.training.global_batch_size} = micro {lay.micro_batch} x {lay.num_micro} x "
          f"DP {lay.dp} | {est.tokens} tokens per sample | {est.parameters:,} parameters per network")
    if not args.brief:
        print("  resident per GPU:")
        for k, v in est.static.items():
            print(f"    {k:22s} {g(v)}")
        print(f"    {'total':22s} {g(sum(est.static.values()))}")
        print("  peak activations per pass:")
        for k, v in est.activations.items():
            print(f"    {k:22s} {g(v)}")
    print("  peak per step (max_memory_allocated): " +
          " | ".join(f"{k} {v:.2f} GiB" for k, v in est.peak_gib.items()) +
          f" | needed with allocator overhead and CUDA context: {est.needed / GiB:.2f} GiB")
    if measured is not None:
        if isinstance(measured.get("resident"), float):
            print(f"  measured between steps (memory_allocated): {measured['resident']:.3f} GiB | estimate "
                  f"{sum(est.static.values()) / GiB:.3f} GiB (resident terms above)")
        for kind, gib in measured.items():
            if kind == "resident":
                continue
            if kind == "breakdown":
                for step, b in gib.items():
                    print(f"  {step} step: {b['peak_above_start_gib']:.3f} GiB above the start at its peak; live then, "
                          f"by the line that allocated it:")
                    for site, v in b["live_at_peak_gib"].items():
                        print(f"    {v * 1024:9.2f} MiB  {site}")
                continue
            if kind == "error":
                print(f"  {gib}")
                continue
            ratio = f"estimate / measured {est.peak_gib[kind] / gib:.3f}" if isinstance(gib, float) else ""
            print(f"  measured peak, {kind} step: {gib if isinstance(gib, str) else f'{gib:.3f} GiB'} | estimate "
                  f"{est.peak_gib.get(kind, float('nan')):.3f} GiB {ratio}")
    for name, gib in cards.items():
        verdict = "fits" if est.fits(gib * GiB) else "does NOT fit"
        print(f"  {name} GPU ({gib:.1f} GiB): {verdict}")
        if args.brief:
            continue
        rows = fitting[name]
        if not rows:
            print(f"    no layout of {gpus} GPU(s) fits")
        for e in rows:
            print(f"    fits: {e.layout.describe()} -> {e.needed / GiB:.1f} GiB  ({e.layout.overrides()})")


def _measure(config, iterations: int, breakdown: bool = False) -> dict:
    """Measured peaks in GiB per step kind; 'out of memory' where the GPU ran out."""
    import torch

    from megatron_rcm.parallel import destroy_parallel
    from megatron_rcm.training.memory import GiB, measure

    if not torch.cuda.is_available():
        sys.exit("error: --measure needs a GPU (the estimate itself needs none)")
    try:
        out = measure(config, iterations, breakdown)
        sites = out.pop("breakdown", None)
        out = {k: v / GiB for k, v in out.items()}
        if sites is not None:
            out["breakdown"] = {kind: {"peak_above_start_gib": peak / GiB,
                                       "live_at_peak_gib": {site: b / GiB for site, b in rows}}
                                for kind, (peak, rows) in sites.items()}
        return out
    except torch.cuda.OutOfMemoryError as e:
        return {"student": "out of memory", "critic": "out of memory", "error": str(e).splitlines()[0]}
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
