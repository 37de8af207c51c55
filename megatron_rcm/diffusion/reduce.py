"""Per-sample reductions that stay correct when latents are sharded across context-parallel ranks.

Every per-sample statistic of the objective (the norm of the sCM target, the DMD normaliser, NaN flags) is a sum
over a sample's elements. A `SumFn` turns the local partial sums `[B]` into global ones; the default is the
identity (unsharded latents), `process_group_sum(group)` all-reduces over a process group.
"""

from typing import Callable, Optional

import torch
import torch.distributed as dist

SumFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps local per-sample partial sums `[B]` to the sums over all shards of each sample."""


def process_group_sum(group: Optional[dist.ProcessGroup]) -> Optional[SumFn]:
    """A `SumFn` that all-reduces over `group` (None or a group of size 1: no reduction)."""
    if group is None or dist.get_world_size(group) == 1:
        return None

    def _sum(partial: torch.Tensor) -> torch.Tensor:
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    return _sum


def per_sample_sum(x: torch.Tensor, sum_fn: Optional[SumFn] = None) -> torch.Tensor:
    """Sum over all but the batch dimension, made global by `sum_fn`; returns `[B]`."""
    partial = x.flatten(1).sum(dim=1)
    return partial if sum_fn is None else sum_fn(partial)


def per_sample_numel(x: torch.Tensor, sum_fn: Optional[SumFn] = None) -> torch.Tensor:
    """Number of elements of each sample over all shards, as a float64 `[B]` tensor."""
    count = torch.full((x.shape[0],), float(x[0].numel()), dtype=torch.float64, device=x.device)
    return count if sum_fn is None else sum_fn(count)


def per_sample_nonfinite(x: torch.Tensor, sum_fn: Optional[SumFn] = None) -> torch.Tensor:
    """Bool `[B]`: whether a sample has a NaN/inf on any shard (so all ranks mask the same samples)."""
    bad = (~torch.isfinite(x)).flatten(1).any(dim=1).to(torch.float64)
    return (bad if sum_fn is None else sum_fn(bad)) > 0


def expand_as_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample `[B]` tensor so that it broadcasts against `x` of shape `[B, ...]`."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def draw(sampler, shape, generator: Optional[torch.Generator], device, dtype=torch.float64) -> torch.Tensor:
    """`sampler(shape)` (`torch.randn`, `torch.rand`) on `device`, drawn on the generator's own device and then moved.
    A CPU generator therefore gives the same numbers on CPU and CUDA (the training loop passes one); a CUDA
    generator draws on its GPU; without a generator the default RNG of `device` draws."""
    return sampler(shape, generator=generator, dtype=dtype, device=_source(generator, device)).to(device)


def _source(generator: Optional[torch.Generator], device) -> torch.device:
    """Where a draw from `generator` happens: the generator's device (the default RNG of `device` without one)."""
    return generator.device if generator is not None else torch.device(device)


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None, dtype=torch.float64) -> torch.Tensor:
    """Standard normal noise shaped like `x` from an explicit generator (float64 by default), drawn on the
    generator's device (see `draw`)."""
    return draw(torch.randn, x.shape, generator, x.device, dtype)


NoiseFn = Callable[[torch.Tensor], torch.Tensor]
"""Draws standard normal noise shaped like its argument. The training loop may pass one that draws the full
(unsharded) noise from a CP-synchronised generator and returns this rank's shard."""


def sharded_noise_fn(generator: torch.Generator, dim: int, rank: int, world_size: int) -> NoiseFn:
    """A `NoiseFn` for latents split into `world_size` equal contiguous chunks along `dim`: every rank draws the
    full noise from the same (CP-synchronised) generator and keeps its own chunk, so the global noise is i.i.d.
    (drawing shard-shaped noise from a synchronised generator would repeat the same noise on every shard). The
    full noise is drawn on the generator's device; only this rank's chunk is moved to the latents' device."""

    def _noise(like: torch.Tensor) -> torch.Tensor:
        shape = list(like.shape)
        shape[dim] *= world_size
        full = torch.randn(shape, generator=generator, dtype=torch.float64, device=_source(generator, like.device))
        return full.chunk(world_size, dim=dim)[rank].contiguous().to(like.device)

    return _noise
