"""Process groups for tensor / context / pipeline / data parallelism on NCCL (GPU) or gloo (CPU).

megatron-core's `parallel_state` owns the groups. This module starts torch.distributed (from torchrun's
environment, or as a one-process group when there is none), picks the backend from the hardware, and makes
megatron-core's sequence-parallel code run without CUDA (see docs/architecture.md, "CPU path").
"""

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

_CPU_DEVICE = torch.device("cpu")


def _cpu_current_device():
    return _CPU_DEVICE


def _no_synchronize(device=None):
    return None


def _allow_megatron_on_cpu():
    # Without CUDA, megatron-core's sequence-parallel gathers allocate on `torch.cuda.current_device()` and
    # dist_checkpointing's writer calls `torch.cuda.synchronize()`; both raise. Pointing the first at the CPU
    # and making the second a no-op is all that megatron's TP/SP layers and dist_checkpointing (torch_dist
    # backend) need to run on gloo (measured; docs/architecture.md, "CPU path").
    if not torch.cuda.is_available():
        torch.cuda.current_device = _cpu_current_device
        torch.cuda.synchronize = _no_synchronize


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    backend: str | None = None,
    timeout_minutes: int = 30,
    seed: int = 1234,
) -> None:
    """Start torch.distributed (if needed) and megatron-core's model-parallel groups, and seed (`set_random_seed`:
    megatron's CUDA RNG tracker, which its GPU weight initialisation needs, included).

    Under torchrun the world comes from its environment (RANK, WORLD_SIZE, MASTER_ADDR, ...); without it a
    one-process world is created. The data-parallel size is what is left of the world size.
    """
    sizes = dict(
        tensor_model_parallel_size=tensor_model_parallel_size,
        context_parallel_size=context_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    backend = backend or default_backend()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * context_parallel_size * pipeline_model_parallel_size
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor ({tensor_model_parallel_size}) x context "
            f"({context_parallel_size}) x pipeline ({pipeline_model_parallel_size}) parallel sizes = {model_parallel}"
        )
    _allow_megatron_on_cpu()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_random_seed(seed)


def ensure_parallel() -> None:
    """Set up a one-process layout when nothing has set one up yet."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        initialize_parallel()


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy and torch; megatron's CUDA RNG tracker (TP-aware dropout/init) only where CUDA is."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def dp_group():
    return parallel_state.get_data_parallel_group()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def cp_group():
    return parallel_state.get_context_parallel_group()


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def cp_rank() -> int:
    return parallel_state.get_context_parallel_rank()


def pp_group():
    return parallel_state.get_pipeline_model_parallel_group()


def pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()
