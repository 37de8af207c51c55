"""Fused elementwise regions of the DiT.

The norms, modulations, RoPE, gates and bias adds between GEMMs are memory-bound: run op by op they cost more
than the GEMMs (measured on H100, benchmarks/RESULTS.md). `fused` compiles such a region with torch.compile on
CUDA so that it reads and writes each activation once; on CPU (tests, float64 references) the same Python
function runs eagerly. Each region is written with the tangent rules, so one function serves the plain, the
with-grad and the JVP pass. `RCM_FUSION=0` turns compilation off.
"""

import functools
import os

import torch


def _enabled() -> bool:
    return os.environ.get("RCM_FUSION", "1") != "0"


def fused(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        nonlocal compiled
        if x.is_cuda and _enabled() and not torch.compiler.is_compiling():
            if compiled is None:
                # one graph per shape: training sees a handful (student, JVP, CFG-doubled teacher, critic, ...)
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                compiled = torch.compile(fn, dynamic=False)
            return compiled(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return wrapper
