"""Run a function on N local processes joined in one gloo/NCCL world (tests, small CPU jobs)."""

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, errors):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        fn(*args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        from megatron_rcm.parallel.state import destroy_parallel

        destroy_parallel()


def run_on_ranks(fn, world_size: int, *args, cuda: bool = False) -> None:
    """Call `fn(*args)` in `world_size` fresh processes with torchrun's environment variables set.

    The processes see no GPU unless `cuda` (then rank r uses GPU r, NCCL): a CPU test behaves the same on a GPU
    node.

    `fn` must be importable (a module-level function). The first failure's traceback is re-raised here.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    # a spawned process reads CUDA_VISIBLE_DEVICES when it starts, before it imports anything that looks at CUDA
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        mp.start_processes(_entry, args=(world_size, port, fn, args, errors), nprocs=world_size,
                           start_method="spawn", join=True)
    except mp.ProcessRaisedException:
        pass
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    if not errors.empty():
        rank, tb = errors.get()
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
