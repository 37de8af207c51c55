"""Parallel setup: process groups (NCCL or gloo), seeding, and helpers to start several processes."""

from megatron_rcm.parallel.launch import run_on_ranks
from megatron_rcm.parallel.pipeline import sum_pipeline_grads
from megatron_rcm.parallel.state import (
    cp_group,
    cp_rank,
    cp_size,
    default_backend,
    destroy_parallel,
    dp_group,
    dp_rank,
    dp_size,
    ensure_parallel,
    initialize_parallel,
    pp_rank,
    pp_size,
    set_random_seed,
    tp_group,
    tp_rank,
    tp_size,
)

__all__ = [
    "cp_group", "cp_rank", "cp_size", "default_backend", "destroy_parallel", "dp_group", "dp_rank", "dp_size",
    "ensure_parallel", "initialize_parallel", "pp_rank", "pp_size", "run_on_ranks", "set_random_seed",
    "sum_pipeline_grads", "tp_group", "tp_rank", "tp_size",
]
