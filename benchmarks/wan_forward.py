#!/usr/bin/env python3
"""Wan DiT forward (and JVP pass) time and peak memory: megatron-rcm next to diffusers, same weights, one GPU.

  python benchmarks/wan_forward.py --preset wan2.1-t2v-1.3b --latent 16 21 60 104 --out wan_forward.json

Random weights (diffusers' init), bf16, batch 1, 512 text tokens. diffusers runs cast with `.to(bfloat16)` (default
attention dispatch, and SDPA forced to cuDNN) and as `from_pretrained(torch_dtype=bfloat16)` loads it (its float32
modules kept in float32, like ours); each baseline is timed again after ours. Ours runs with its own backend choice
(see models/attention.py).
"""

import argparse
import contextlib
import os
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from timing import save, timed, timing_line  # noqa: E402


def _rel_err(x, ref):
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm()).item()


@contextlib.contextmanager
def _environment(assignments):
    saved = dict(os.environ)
    os.environ.update(assignments)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--latent", type=int, nargs=4, default=[16, 21, 60, 104], metavar=("C", "T", "H", "W"))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--skip-jvp", action="store_true")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                   help="also time our forward with these environment switches set (README, Performance switches), "
                        "in the same process after the default; repeatable. Switches read at compile time "
                        "(RCM_FUSION_TUNING) need a process of their own.")
    p.add_argument("--out")
    args = p.parse_args()

    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_rcm.checkpoint import wan as wan_keys
    from megatron_rcm.checkpoint.sharding import load_full_state_dict
    from megatron_rcm.models.attention import attention_backend
    from megatron_rcm.models.wan import PRESETS, WanModel

    cfg = PRESETS[args.preset]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(dev):
        ref = WanTransformer3DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    # diffusers' own bf16 loading keeps its `_keep_in_fp32_modules` (time embedder, modulation tables, norms, RoPE)
    # in float32, as our model does; `.to(bf16)` casts them too (diffusers warns about it). Time both.
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ref_pretrained = WanTransformer3DModel.from_pretrained(tmp, torch_dtype=torch.bfloat16).to(dev).eval()
    ref = ref.to(torch.bfloat16).eval()
    ours = WanModel(cfg, params_dtype=torch.bfloat16, perform_initialization=False).to(dev)
    load_full_state_dict(ours, wan_keys.hf_to_mcore(ref.state_dict(), cfg.num_attention_heads))
    ours.eval()
    build_s = time.time() - t0

    c, f, h, w = args.latent
    x = torch.randn(1, c, f, h, w, device=dev, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=dev)
    text = torch.randn(1, 512, cfg.text_dim, device=dev, dtype=torch.bfloat16)
    tokens = f * (h // 2) * (w // 2)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
               "latent": args.latent, "tokens": tokens, "our_attention_backend": attention_backend("cuda", 9),
               "build_s": build_s}

    variants = [(name, dict(kv.split("=", 1) for kv in assignments.split(",") if kv))
                for name, _, assignments in (spec.partition(":") for spec in args.variant)]
    with torch.no_grad():
        results["diffusers_default"] = timed(lambda: ref(x, t, text, return_dict=False), args.iters)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            results["diffusers_cudnn"] = timed(lambda: ref(x, t, text, return_dict=False), args.iters)
        results["diffusers_from_pretrained"] = timed(lambda: ref_pretrained(x, t, text, return_dict=False),
                                                     args.iters)
        t1 = time.time()
        ours(x, t, text)
        torch.cuda.synchronize()
        results["ours_forward_first_call_s"] = time.time() - t1  # compiles the fused regions
        results["ours_forward"] = timed(lambda: ours(x, t, text), args.iters)
        a = ref(x, t, text, return_dict=False)[0].float()
        b = ours(x, t, text).float()
        results["ours_vs_diffusers_rel_err"] = _rel_err(b, a)
        a = ref_pretrained(x, t, text, return_dict=False)[0].float()
        results["ours_vs_diffusers_from_pretrained_rel_err"] = _rel_err(b, a)
        del a, b
        for name, env in variants:
            with _environment(env):
                results[f"ours_forward[{name}]"] = timed(lambda: ours(x, t, text), args.iters)
        # the baselines again, after ours: drift of the card shows here
        results["diffusers_default_after"] = timed(lambda: ref(x, t, text, return_dict=False), args.iters)
        results["diffusers_from_pretrained_after"] = timed(lambda: ref_pretrained(x, t, text, return_dict=False),
                                                           args.iters)
    if not args.skip_jvp:
        tx, tt = torch.randn_like(x), torch.tensor([1.0], device=dev)
        t1 = time.time()
        ours.jvp(x, t, text, tx, tt)
        torch.cuda.synchronize()
        results["ours_jvp_first_call_s"] = time.time() - t1
        results["ours_jvp"] = timed(lambda: ours.jvp(x, t, text, tx, tt), args.iters)
        out, tangent = ours.jvp(x, t, text, tx, tt)
        for name, env in variants:
            with _environment(env):
                results[f"ours_jvp[{name}]"] = timed(lambda: ours.jvp(x, t, text, tx, tt), args.iters)
                out_v, tangent_v = ours.jvp(x, t, text, tx, tt)
            results[f"ours_jvp[{name}]_rel_diff"] = {"output": _rel_err(out_v, out),
                                                     "tangent": _rel_err(tangent_v, tangent)}
            print(f"jvp [{name}] vs default: {results[f'ours_jvp[{name}]_rel_diff']}")
    for k, r in results.items():
        if isinstance(r, dict) and "ms_median" in r:
            print(timing_line(k, r, 32))
    ours_ms = results["ours_forward"]["ms_median"]
    for k in ("diffusers_default", "diffusers_default_after", "diffusers_from_pretrained",
              "diffusers_from_pretrained_after"):
        print(f"ours / {k} = {ours_ms / results[k]['ms_median']:.3f}")
    save(results, args.out)


if __name__ == "__main__":
    main()
