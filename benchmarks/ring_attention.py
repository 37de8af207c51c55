"""Ring attention step cost: one K/V block's attention and the merge of its partial result, on one GPU.

A ring-attention rank computes, per step, its queries against one K/V block (Sq = Sk = tokens / CP) and merges
the partial result into its running one (the (o, lse) / (o, o_tangent, lse, mu) merge of
docs/architecture.md, "Context parallelism"). This times both parts at Wan-14B 720p shard shapes
(75,600 tokens per sample, B1 H40 D128, bf16) for CP 2 / 4 / 8, with CUDA events (median of
`triton.testing.do_bench`):

* JVP pass: `attention_jvp(..., out_dtype=float32)` (our kernel: `(o, to, lse, mu)` unrounded), then
  `merge_attention_partials([running, part])` on those;
* plain pass: `attention_with_lse` (one block's `(o, lse)`), then its `(o, lse)` merge;
* with-grad pass: `attention_block_backward` of one block against merged `(o, lse)`.

The merge's time as a share of its kernel's (target <= 3 %) is printed per row. The send/receive of the next
block is not timed here (it overlaps the kernel; the multi-GPU runs measure it).

    python benchmarks/ring_attention.py [--tokens 75600] [--cp 2,4,8] [--heads 40] [--json ring_attention.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=75600, help="tokens per sample (Wan 720p x 81 frames)")
    parser.add_argument("--cp", default="2,4,8", help="context-parallel sizes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--no-backward", action="store_true", help="skip the with-grad block backward")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch
    import triton

    from megatron_rcm.models.attention import (
        attention_block_backward,
        attention_jvp,
        attention_with_lse,
        merge_attention_partials,
    )
    from timing import save

    if not torch.cuda.is_available():
        raise SystemExit("ring_attention.py needs a CUDA GPU")

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    rows = []
    b, h, d = args.batch, args.heads, args.head_dim
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for cp in (int(c) for c in args.cp.split(",")):
        s = -(-args.tokens // cp)
        gen = torch.Generator(device="cuda").manual_seed(cp)
        q, k, v, tq, tk, tv = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                               for _ in range(6))
        shape = f"B{b} H{h} Sq=Sk={s} D{d} (CP {cp})"
        print(shape, flush=True)

        # JVP pass: the kernel's fp32 partials and the (o, to, lse, mu) merge of two of them
        part = attention_jvp(q, k, v, tq, tk, tv, out_dtype=torch.float32)
        running = attention_jvp(q, v, k, tq, tv, tk, out_dtype=torch.float32)  # another block's partial
        kernel_ms = bench(lambda: attention_jvp(q, k, v, tq, tk, tv, out_dtype=torch.float32))
        merge_ms = bench(lambda: merge_attention_partials([running, part]))
        rows.append(dict(pass_="jvp", shape=shape, cp=cp, kernel_ms=kernel_ms, merge_ms=merge_ms,
                         merge_share=merge_ms / kernel_ms))
        del part, running

        # plain pass: one block's (o, lse) and their merge
        o, lse = attention_with_lse(q, k, v)
        o2, lse2 = attention_with_lse(q, v, k)
        plain_ms = bench(lambda: attention_with_lse(q, k, v))
        plain_merge_ms = bench(lambda: merge_attention_partials([(o2, None, lse2, None), (o, None, lse, None)]))
        rows.append(dict(pass_="plain", shape=shape, cp=cp, kernel_ms=plain_ms, merge_ms=plain_merge_ms,
                         merge_share=plain_merge_ms / plain_ms))

        if not args.no_backward:
            do = torch.randn_like(q)
            backward_ms = bench(lambda: attention_block_backward(do, q, k, v, o, lse))
            rows.append(dict(pass_="backward", shape=shape, cp=cp, kernel_ms=backward_ms, merge_ms=0.0,
                             merge_share=0.0))
            del do
        del o, lse, o2, lse2, q, k, v, tq, tk, tv
        torch.cuda.empty_cache()
        for r in rows[-3:]:
            if r["cp"] == cp:
                print(f"  {r['pass_']:8s} kernel {r['kernel_ms']:9.3f} ms  merge {r['merge_ms']:7.3f} ms  "
                      f"share {100 * r['merge_share']:5.2f} %  (target <= 3 %)", flush=True)
    save({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
