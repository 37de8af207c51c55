#!/usr/bin/env python3
"""Activation memory of the tiny shapes DiT counted on the CPU, next to the memory estimator's terms.

  python benchmarks/tiny_activation_memory.py            # model passes, then two real trainer steps
  python benchmarks/tiny_activation_memory.py --no-trainer

Rows (float32, eager, one thread):
  model, batch B, T text tokens   one with-grad forward of `wan-shapes-tiny` on [B, 3, 8, 16, 16] latents: the bytes
                                  autograd saves for the backward (saved-tensor hooks, distinct storages, parameters
                                  left out) and the CPU allocator's peak above the start over the forward and the
                                  backward (torch.profiler's memory timeline);
  trainer, <kind> step            the peak above the start of one `Trainer.train_step` of the tiny default (one
                                  process, `rcm.tangent_warmup=0`), per step kind, after two unprofiled steps;
and the estimator's with-grad activation term of the same batch (`training.memory`; at the tiny default's 5 text
tokens).
What the CPU cannot show is the GPU's own allocations (workspaces, compiled regions): `tools/estimate_memory.py
--measure N --breakdown` on a GPU.
"""

import argparse
import json
import os
import sys
import tempfile

import torch

MiB = 2**20


def _timeline_peak(prof, path: str) -> float:
    """Peak minus start of the CPU allocator's total in a profile with profile_memory=True, in bytes."""
    prof.export_memory_timeline(path, device="cpu")
    with open(path) as f:
        _, sizes = json.load(f)
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0] if totals else 0.0


def _profiled(fn, tmp: str) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    return _timeline_peak(prof, os.path.join(tmp, "timeline.json"))


def model_rows(batches, texts, tmp: str) -> list[dict]:
    from megatron_rcm.models import get_preset
    from megatron_rcm.models.loading import ARCHITECTURES, build_model

    arch, config = get_preset("wan-shapes-tiny")
    model = build_model(ARCHITECTURES[arch], config, torch.float32, False, torch.device("cpu"))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = []
    for batch in batches:
        for text_tokens in texts:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, config.in_channels, 8, 16, 16, generator=g)
            t = torch.rand(batch, generator=g) * 1000
            text = torch.randn(batch, text_tokens, config.text_dim, generator=g)
            saved: dict = {}

            def pack(tensor):
                ptr = tensor.untyped_storage().data_ptr()
                if ptr not in params:
                    saved[ptr] = tensor.untyped_storage().nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                model(x, t, text)

            def forward_backward():
                model.zero_grad(set_to_none=True)
                model(x, t, text).square().mean().backward()

            peak = _profiled(forward_backward, tmp)
            rows.append({"row": f"model, batch {batch}, {text_tokens} text tokens", "saved_mib": sum(saved.values()) / MiB,
                         "peak_mib": peak / MiB})
            if text_tokens == 5:  # the shapes set's caption length, what the estimator counts for this config
                rows[-1]["estimate_mib"] = estimated_with_grad(batch) / MiB
    return rows


def estimated_with_grad(batch: int) -> float:
    """The estimator's with-grad activation bytes of one tiny-default pass of `batch` samples (its 5 text tokens)."""
    from megatron_rcm.training import memory
    from megatron_rcm.training.config import load_config

    config = load_config(None, [f"training.micro_batch_size={batch}", f"training.global_batch_size={batch}"])
    return memory.estimate(config, 1).activations["critic_with_grad"]  # the critic's pass: one micro-batch


def trainer_rows(tmp: str) -> list[dict]:
    from megatron_rcm.training.config import load_config
    from megatron_rcm.training.trainer import Trainer

    config = load_config(None, ["rcm.tangent_warmup=0", "logging.tensorboard=false", "logging.eval_interval=0",
                                "checkpoint.save_interval=0", f"run_dir={os.path.join(tmp, 'run')}"])
    trainer = Trainer(config)
    for it in range(2):
        trainer.train_step(it)
    rows = []
    for it in range(2, 4):
        out = {}
        peak = _profiled(lambda: out.update(trainer.train_step(it)), tmp)
        rows.append({"row": f"trainer, {out['phase']} step", "peak_mib": peak / MiB})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    p.add_argument("--text-tokens", type=int, nargs="+", default=[5, 512])
    p.add_argument("--no-trainer", action="store_true", help="leave out the trainer steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = model_rows(args.batch, args.text_tokens, tmp)
        if not args.no_trainer:
            rows += trainer_rows(tmp)
    for r in rows:
        cells = [f"{k} {r[k]:.1f} MiB" for k in ("saved_mib", "peak_mib", "estimate_mib") if k in r]
        print(f"{r['row']:38s} " + " | ".join(cells), flush=True)
    print(json.dumps(rows), file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
