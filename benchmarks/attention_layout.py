#!/usr/bin/env python3
"""cuDNN SDPA at the Wan-1.3B self-attention shape for the two memory layouts the DiT could hand it.

  python benchmarks/attention_layout.py

`[S, B, H, D]` memory seen as a `[B, H, S, D]` view (what the blocks pass: q/k/v come out of the projection token-
major, and the output goes back into the projection without a copy) against contiguous `[B, H, S, D]`
(head-major), bf16, no grad, `triton.testing.do_bench` medians; each layout timed twice, interleaved.
"""

import argparse

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, default=[32760, 1, 12, 128], metavar=("S", "B", "H", "D"))
    args = p.parse_args()
    S, B, H, D = args.shape
    torch.manual_seed(0)
    token_major = [torch.randn(S, B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    views = [t.permute(1, 2, 0, 3) for t in token_major]
    head_major = [t.contiguous() for t in views]

    def run(qkv):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(*qkv)

    with torch.no_grad():
        for name, qkv in (("[S,B,H,D] memory", views), ("[B,H,S,D] contiguous", head_major)) * 2:
            o = run(qkv)
            ms = triton.testing.do_bench(lambda: run(qkv), warmup=50, rep=400)
            print(f"{name:22s} {ms:7.3f} ms   output strides {tuple(o.stride())}")


if __name__ == "__main__":
    main()
