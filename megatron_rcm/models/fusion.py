"""Fused elementwise regions of the DiT.

The norms, modulations, RoPE, gates and bias adds between GEMMs are memory-bound: run op by op they cost more
than the GEMMs (measured on H100, benchmarks/RESULTS.md). `fused` compiles such a region with torch.compile on
CUDA so that it reads and writes each activation once; on CPU (tests, float64 references) the same Python
function runs eagerly. Each region is written with the tangent rules, so one function serves the plain, the
with-grad and the JVP pass. `RCM_FUSION=0` turns compilation off.

`chain` joins two regions whose second consumes the first's `(x, x_tangent)` (a residual update and the norm after
it) into one, so that the updated x is written once and never read back. `RCM_RESIDUAL_NORM_FUSION=0` runs such
pairs as their two separate regions again (for timing).

The switches (`RCM_FUSION`, `RCM_RESIDUAL_NORM_FUSION`, `RCM_FUSION_TUNING`) are the training config's
`kernels.fusion`, `kernels.residual_norm_fusion` and `kernels.fusion_tuning`; a variable set in the environment
overrides its key.
"""

import functools
import os

import torch


def switch(name: str, default: bool = True) -> bool:
    """A switch read from the environment at each call: `NAME=0` turns it off, `NAME=1` on."""
    return os.environ.get(name, "1" if default else "0") != "0"


def _inductor_options() -> dict:
    from torch._inductor import config

    options = {"triton.mix_order_reduction": False} if hasattr(config.triton, "mix_order_reduction") else {}
    if switch("RCM_FUSION_TUNING", default=False):
        # search block sizes / warps of each generated kernel at compile time: slightly faster forwards for a much
        # longer first call (benchmarks/RESULTS.md); off by default, as few-step generation pays for the first call
        options.update({"coordinate_descent_tuning": True, "max_autotune_pointwise": True})
    return options


def _enabled() -> bool:
    return switch("RCM_FUSION")


def fused(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        nonlocal compiled
        if x.is_cuda and _enabled() and not torch.compiler.is_compiling():
            if compiled is None:
                # one graph per shape: training sees a handful (student, JVP, CFG-doubled teacher, critic, ...)
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                # Inductor's mix-order reduction (default since torch 2.10) fuses the backward's reductions over
                # tokens and channels; for modulated norms whose modulation broadcasts over the tokens (adaLN
                # at a local batch of 1, or a shared scale/shift table) it returns wrong gradients or wrongly
                # shaped ones (pytorch/pytorch#193061, #178080; seen here in the 1.3B scale probe). Off.
                compiled = torch.compile(fn, dynamic=False, options=_inductor_options())
            return compiled(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return wrapper


def chain(first, second, name: str = "RCM_RESIDUAL_NORM_FUSION"):
    """One fused region computing `x, x_tangent = first(x, x_tangent, *first_args)` and then
    `second(x, x_tangent, *second_args)`; returns `(x, x_tangent, *second's outputs)`. `first` and `second` are
    `fused` regions; with the switch `name` off they run as such, one after the other."""

    def both(x, x_tangent, first_args, second_args):
        x, x_tangent = first.__wrapped__(x, x_tangent, *first_args)
        return (x, x_tangent, *second.__wrapped__(x, x_tangent, *second_args))

    both.__name__ = both.__qualname__ = f"{first.__name__}_{second.__name__}"
    region = fused(both)

    @functools.wraps(both)
    def run(x, x_tangent, first_args: tuple, second_args: tuple):
        if switch(name):
            return region(x, x_tangent, first_args, second_args)
        x, x_tangent = first(x, x_tangent, *first_args)
        return (x, x_tangent, *second(x, x_tangent, *second_args))

    return run
