#!/usr/bin/env python3
"""Relative cost of sizes of the tiny shapes DiT (CPU): what a larger tiny teacher would cost the tiny default.

  python benchmarks/tiny_model_cost.py                              # the preset and a few larger variants
  python benchmarks/tiny_model_cost.py --variant num_layers=4,ffn_dim=256

Per variant of `wan-shapes-tiny` (random weights, float32, one thread): the mean time of one no-grad forward plus
one forward and backward at batch 16 (the tiny default's micro-batch 8 with its sCM and DMD inputs), after two
warm-up rounds, and its ratio to the preset. The tiny default's wall time scales about with this ratio (its
iteration is these passes; start-up and evaluation scale too).
"""

import argparse
import dataclasses
import json
import time

import torch

DEFAULT_VARIANTS = ["", "ffn_dim=256", "num_layers=4", "num_layers=4,ffn_dim=256", "num_attention_heads=6",
                    "ffn_dim=512"]


def parse_variant(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value)
    return out


def seconds_per_round(config, rounds: int, batch: int) -> float:
    from megatron_rcm.models import WanModel

    torch.manual_seed(0)
    model = WanModel(config)
    x = torch.randn(batch, config.in_channels, 8, 16, 16)
    t = torch.rand(batch) * 1000
    text = torch.randn(batch, 5, config.text_dim)

    def one():
        with torch.no_grad():
            model(x, t, text)
        model(x, t, text).square().mean().backward()

    for _ in range(2):
        one()
    t0 = time.perf_counter()
    for _ in range(rounds):
        one()
    return (time.perf_counter() - t0) / rounds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=None,
                   help="comma-separated WanConfig overrides, e.g. num_layers=4,ffn_dim=256 (repeatable; the preset "
                        "itself is always measured first)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron_rcm.parallel import initialize_parallel
    from megatron_rcm.training.config import TINY_SHAPES_MODEL

    initialize_parallel(backend="gloo")
    variants = [""] + [v for v in (args.variant or DEFAULT_VARIANTS) if v]
    rows, base = [], None
    for v in variants:
        config = dataclasses.replace(TINY_SHAPES_MODEL, **parse_variant(v))
        from megatron_rcm.models import WanModel

        params = sum(q.numel() for q in WanModel(config).parameters())
        s = seconds_per_round(config, args.rounds, args.batch)
        base = base or s
        rows.append({"variant": v or "preset", "parameters": params, "ms": round(s * 1e3, 1), "ratio": round(s / base, 2)})
        print(f"{v or 'preset':28s} {params:9,d} parameters  {s * 1e3:7.1f} ms  x{s / base:.2f}", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
