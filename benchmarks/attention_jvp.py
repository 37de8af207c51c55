"""Attention JVP benchmark: our FA2-JVP kernels against SDPA forward, torch.func.jvp and the rCM reference.

One GPU, one process. For each shape ``B H S D`` (self-attention, bf16, tangents on q, k and v) it
times, with CUDA events (median of ``triton.testing.do_bench``):

* ``ours``            — ``rcm_kernels.flash_attention_jvp`` on contiguous ``[B, H, S, D]`` tensors, in its
  default precise mode and with ``precise=False`` (on Hopper the warp-specialised kernel; ``--sweep`` with a
  last config field ``0`` times the portable Triton kernel, ``--alternate N`` both in turn),
* ``ours [S,B,H,D]``  — the same on permuted views of ``[S, B, H, D]`` (the DiT's layout),
* ``sdpa cudnn`` / ``sdpa flash`` — plain attention forward, no tangents (the floor of what a JVP
  can cost is about 3x these),
* ``func.jvp math``   — ``torch.func.jvp`` over the math SDPA backend, where its ``[S, S]`` matrices fit,
* ``reference``       — the rCM reference Triton kernel, when its file is given with ``--ref-dir``.

TFLOP/s use ``3 x 4 B H Sq Sk D`` for JVPs (six GEMMs per tile) and ``4 B H Sq Sk D`` for forwards.
``first call`` is the wall time of the first call in a fresh Triton cache (compilation, autotuning).
Prints a table and writes JSON.

    python benchmarks/attention_jvp.py --json attention_jvp.json [--ref-dir DIR] [--sweep "128,64,8,2;..."]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

DEFAULT_SHAPES = "1,12,32760,128;1,12,8192,128;1,40,8190,128"


def _parse_shapes(text):
    return [tuple(int(x) for x in item.split(",")) for item in text.split(";") if item]


def _card_state() -> str:
    query = "--query-gpu=clocks.sm,power.draw,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return "card: " + out.stdout.strip().replace(", ", " / ") + " C"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="'B,H,S,D;...'")
    parser.add_argument("--json", default="attention_jvp.json")
    parser.add_argument("--ref-dir", default=None, help="folder holding the reference kernel module")
    parser.add_argument("--ref-module", default="rcm_reference_fa_jvp")
    parser.add_argument("--ref-shapes", default="all", help="'all', 'none' or comma-separated shape indices")
    parser.add_argument("--sweep", default="",
                        help="kernel configs 'block_m,block_n,warps,stages[,skip_rescale[,precise]];...'")
    parser.add_argument("--sweep-shapes", default="0,1", help="shape indices the sweep runs on")
    parser.add_argument("--func-jvp-max-gib", type=float, default=60.0)
    parser.add_argument("--cross-sk", type=int, default=512, help="text length for the cross-attention rows")
    parser.add_argument("--keep-triton-cache", action="store_true")
    parser.add_argument("--accuracy", action="store_true", help="also print each config's error vs float64")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="also time the default and the portable kernel N times in turn per shape, with the "
                             "card's clock, power and temperature after each (a power-limited card drifts)")
    args = parser.parse_args(argv)

    # First-call numbers must include compilation: start from an empty Triton cache.
    if not args.keep_triton_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")

    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rcm_kernels import default_config, flash_attention_jvp, parse_config

    reference = None
    if args.ref_dir:
        sys.path.insert(0, args.ref_dir)
        reference_module = __import__(args.ref_module)
        reference = reference_module.attention

    device = torch.cuda.get_device_name()
    shapes = _parse_shapes(args.shapes)
    ref_idx = (set(range(len(shapes))) if args.ref_shapes == "all"
               else set() if args.ref_shapes == "none" else {int(i) for i in args.ref_shapes.split(",")})
    sweep = [parse_config(c) for c in args.sweep.split(";") if c]
    sweep_idx = {int(i) for i in args.sweep_shapes.split(",") if i}
    rows = []

    def bench(fn, rep=400):
        return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")

    def first_call(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    def add(shape, name, ms, flops, first=None, note=""):
        rows.append(dict(shape="B{} H{} S{} D{}".format(*shape), impl=name, ms=ms,
                         tflops=None if ms is None else flops / ms / 1e9, first_call_s=first, note=note))
        print(f"  {name:28s} {'-' if ms is None else f'{ms:9.3f} ms'}  "
              f"{'' if ms is None else f'{flops / ms / 1e9:6.0f} TFLOP/s'}  "
              f"{'' if first is None else f'first call {first:.2f} s'} {note}", flush=True)

    def cfg_name(kernel_config):
        return ",".join(str(int(x)) for x in dataclasses.astuple(kernel_config))

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    accuracy = []
    if args.accuracy:
        # Error of each kernel configuration against float64, next to torch.func.jvp over math SDPA in
        # the same dtype (the bar the GPU tests hold the default configuration to: <= 1.2x).
        from megatron_rcm.models.attention import math_attention_jvp

        B, H, S, D = 1, 4, 2000, 128
        scale = D ** -0.5
        gen = torch.Generator(device="cuda").manual_seed(123)
        q, k, v, tq, tk, tv = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                               for _ in range(6))
        ref = math_attention_jvp(*(x.double() for x in (q, k, v, tq, tk, tv)), scale=scale)

        def sdpa_math(q, k, v):
            with sdpa_kernel([SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        def lse(q, k):
            return torch.logsumexp(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)

        base = torch.func.jvp(sdpa_math, (q, k, v), (tq, tk, tv)) + torch.func.jvp(lse, (q, k), (tq, tk))
        base_err = [rel(b, r) for b, r in zip(base, ref)]
        print("accuracy at B1 H4 S2000 D128 bf16: error vs float64 (ratio to func.jvp math sdpa)")
        print("  func.jvp math sdpa: o {:.2e} to {:.2e} lse {:.2e} mu {:.2e}".format(*base_err))
        default = default_config(D, S, S, B * H)
        for kernel_config in [default, dataclasses.replace(default, precise=False)] + sweep:
            try:
                got = flash_attention_jvp(q, k, v, tq, tk, tv, scale=scale, config=kernel_config)
            except Exception as exc:
                print(f"  {kernel_config}: failed {type(exc).__name__}")
                continue
            err = [rel(g, r) for g, r in zip(got, ref)]
            name = cfg_name(kernel_config)
            accuracy.append(dict(config=name, errors=err, baseline_errors=base_err))
            print(f"  {name:24s} " + " ".join(f"{n} {e:.2e} ({e / b:.2f}x)"
                                               for n, e, b in zip(("o", "to", "lse", "mu"), err, base_err)))
        del q, k, v, tq, tk, tv, ref, base

    for i, shape in enumerate(shapes):
        B, H, S, D = shape
        print(f"shape B{B} H{H} S{S} D{D} on {device}", flush=True)
        fwd_flops = 4 * B * H * S * S * D
        jvp_flops = 3 * fwd_flops
        gen = torch.Generator(device="cuda").manual_seed(i)
        q, k, v, tq, tk, tv = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                               for _ in range(6))

        t_first, ours = first_call(lambda: flash_attention_jvp(q, k, v, tq, tk, tv))
        kernel_config = default_config(D, S, S, B * H)
        add(shape, "ours (default: precise)", bench(lambda: flash_attention_jvp(q, k, v, tq, tk, tv)), jvp_flops,
            t_first, f"config {cfg_name(kernel_config)}")
        fast = dataclasses.replace(kernel_config, precise=False)
        t_fast, _ = first_call(lambda: flash_attention_jvp(q, k, v, tq, tk, tv, config=fast))
        add(shape, "ours fast (precise=False)", bench(lambda: flash_attention_jvp(q, k, v, tq, tk, tv, config=fast)),
            jvp_flops, t_fast, f"config {cfg_name(fast)}")

        sbhd = [x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for x in (q, k, v, tq, tk, tv)]
        check = flash_attention_jvp(*sbhd)
        note = f"max |diff| vs contiguous o {(check[0] - ours[0]).abs().max().item():.1e}"
        add(shape, "ours [S,B,H,D] views", bench(lambda: flash_attention_jvp(*sbhd)), jvp_flops, note=note)
        del sbhd, check

        for kernel_config in sweep if i in sweep_idx else []:
            name = f"ours cfg {cfg_name(kernel_config)}"
            try:
                t_cfg, _ = first_call(lambda: flash_attention_jvp(q, k, v, tq, tk, tv, config=kernel_config))
                add(shape, name, bench(lambda: flash_attention_jvp(q, k, v, tq, tk, tv, config=kernel_config)),
                    jvp_flops, t_cfg)
            except Exception as exc:  # out of shared memory / registers for this config
                add(shape, name, None, jvp_flops, note=f"failed: {type(exc).__name__}: {str(exc)[:80]}")

        for name, backend in (("sdpa cudnn (fwd only)", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa flash (fwd only)", SDPBackend.FLASH_ATTENTION)):
            def sdpa(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v)
            try:
                t_sdpa, _ = first_call(sdpa)
                add(shape, name, bench(sdpa), fwd_flops, t_sdpa)
            except Exception as exc:
                add(shape, name, None, fwd_flops, note=f"failed: {type(exc).__name__}")

        # math SDPA under forward AD keeps a few fp32 [S, S] matrices per head alive.
        need_gib = 6 * B * H * S * S * 4 / 2**30
        if need_gib <= args.func_jvp_max_gib:
            def func_jvp():
                def sdpa(q, k, v):
                    with sdpa_kernel([SDPBackend.MATH]):
                        return F.scaled_dot_product_attention(q, k, v)
                return torch.func.jvp(sdpa, (q, k, v), (tq, tk, tv))
            try:
                t_fj, fj = first_call(func_jvp)
                note = f"ours vs it: o {rel(ours[0], fj[0]):.1e} to {rel(ours[1], fj[1]):.1e}"
                del fj
                add(shape, "func.jvp math sdpa", bench(func_jvp, rep=1000), jvp_flops, t_fj, note)
            except torch.OutOfMemoryError:
                add(shape, "func.jvp math sdpa", None, jvp_flops, note="out of memory")
            torch.cuda.empty_cache()
        else:
            add(shape, "func.jvp math sdpa", None, jvp_flops, note=f"skipped: needs ~{need_gib:.0f} GiB")

        if reference is not None and i in ref_idx:
            t_ref, ref_out = first_call(lambda: reference(q, k, v, tq, tk, tv, D ** -0.5))
            best = getattr(getattr(reference_module, "_attn_fwd", None), "best_config", None)
            note = (f"ours vs it: o {rel(ours[0], ref_out[0]):.1e} to {rel(ours[1], ref_out[1]):.1e}; "
                    f"autotuned {best}")
            del ref_out
            add(shape, "reference rCM kernel", bench(lambda: reference(q, k, v, tq, tk, tv, D ** -0.5)),
                jvp_flops, t_ref, note)

        if args.alternate:
            portable = dataclasses.replace(default_config(D, S, S, B * H), warp_specialized=False)
            for r in range(args.alternate):
                for name, kernel_config in (("default", None), ("portable", portable)):
                    ms = bench(lambda: flash_attention_jvp(q, k, v, tq, tk, tv, config=kernel_config))
                    add(shape, f"alternate {r + 1}: {name}", ms, jvp_flops, note=_card_state())

        if i == 0 and args.cross_sk:
            # Cross-attention to text: tangents on the queries only.
            Sk = args.cross_sk
            kc, vc = (torch.randn(B, H, Sk, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
            zk, zv = torch.zeros_like(kc), torch.zeros_like(vc)
            cross_flops = 3 * 4 * B * H * S * Sk * D
            t_c, _ = first_call(lambda: flash_attention_jvp(q, kc, vc, tq))
            add(shape, f"ours cross Sk={Sk} tk=tv=None", bench(lambda: flash_attention_jvp(q, kc, vc, tq)),
                cross_flops, t_c, "TFLOP/s on the 6-GEMM count")
            add(shape, f"ours cross Sk={Sk} zero tk, tv", bench(lambda: flash_attention_jvp(q, kc, vc, tq, zk, zv)),
                cross_flops)
        del q, k, v, tq, tk, tv, ours
        torch.cuda.empty_cache()

    result = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows, accuracy=accuracy)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n{device}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"| shape | implementation | ms | TFLOP/s | first call (s) | note |")
    print(f"|---|---|---:|---:|---:|---|")
    for r in rows:
        ms = "—" if r["ms"] is None else f"{r['ms']:.2f}"
        tf = "—" if r["tflops"] is None else f"{r['tflops']:.0f}"
        fc = "" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"
        print(f"| {r['shape']} | {r['impl']} | {ms} | {tf} | {fc} | {r['note']} |")


if __name__ == "__main__":
    main()
