"""megatron-rcm model checkpoints: megatron-core `dist_checkpointing` (torch_dist backend) + a JSON header.

Each parameter is saved as a ShardedTensor under its global name with its tensor-parallel slice offsets, so a
checkpoint written at one TP size loads at any other. Writes go to a side directory that is renamed into place
only when complete: a crash never leaves something that looks like a checkpoint.
"""

import json
import os
import shutil
import uuid

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_rcm.parallel import state

HEADER = "megatron_rcm.json"
FORMAT = "megatron-rcm-model/1"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def sharded_state_dict(model: torch.nn.Module, prefix: str = "", tensors: dict | None = None) -> dict:
    """ShardedTensors for every parameter of `model` (or for `tensors`, shaped like the parameters).

    Replica ids: 0 marks the one copy that is written; tensor-parallel-replicated parameters are copies on the
    other TP ranks, and every parameter is replicated across data-parallel ranks."""
    tp, tp_rank = state.tp_size(), state.tp_rank()
    dp_rank = state.dp_rank() * state.cp_size() + state.cp_rank()
    out = {}
    for name, p in model.named_parameters():
        data = p.detach() if tensors is None else tensors[name]
        key = prefix + name
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            out[key] = ShardedTensor.from_rank_offsets(key, data, (p.partition_dim, tp_rank, tp),
                                                       replica_id=(0, 0, dp_rank))
        else:
            out[key] = ShardedTensor.from_rank_offsets(key, data, replica_id=(0, tp_rank, dp_rank))
    return out


def write_header(path: str, header: dict) -> None:
    with open(os.path.join(path, HEADER), "w") as f:
        json.dump({"format": FORMAT, **header}, f, indent=2)


def read_header(path: str) -> dict | None:
    file = os.path.join(path, HEADER)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        header = json.load(f)
    if header.get("format") != FORMAT:
        raise ValueError(f"{file}: unknown checkpoint format {header.get('format')!r} (expected {FORMAT!r})")
    return header


def atomic_dir(final: str) -> str:
    """A fresh side directory next to `final`, the same on every rank (rank 0 picks the name)."""
    name = [f"{final.rstrip('/')}.incomplete-{uuid.uuid4().hex[:8]}"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    if _is_rank0():
        os.makedirs(name[0])
    _barrier()
    return name[0]


def commit_dir(tmp: str, final: str) -> None:
    """Rename the finished side directory into place (replacing an older `final`)."""
    _barrier()
    if _is_rank0():
        if os.path.exists(final):
            old = f"{final.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    _barrier()


def save_model(model: torch.nn.Module, path: str, header: dict) -> None:
    """Save `model` (all ranks call this) to directory `path`."""
    tmp = atomic_dir(path)
    dist_checkpointing.save(sharded_state_dict(model), tmp)
    if _is_rank0():
        write_header(tmp, header)
    commit_dir(tmp, path)


def tensor_shapes(path: str) -> dict[str, tuple]:
    """Global shapes of the tensors stored in a dist_checkpointing directory (read from its metadata)."""
    meta = dist_checkpointing.load_tensors_metadata(path)
    return {k: tuple(v.global_shape) for k, v in meta.items()}


@torch.no_grad()
def load_model(model: torch.nn.Module, path: str) -> None:
    """Load parameters saved by `save_model` (at any tensor-parallel size) into `model`."""
    from megatron_rcm.checkpoint.sharding import check_state_dict

    shapes = tensor_shapes(path)
    check_state_dict(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, f"checkpoint {path}")
    empty = {n: torch.empty_like(p) for n, p in model.named_parameters()}
    loaded = dist_checkpointing.load(sharded_state_dict(model, tensors=empty), path)
    for name, p in model.named_parameters():
        p.copy_(loaded[name])


def save_full(sd: dict[str, torch.Tensor], path: str, header: dict) -> None:
    """Save full (unsharded) tensors from one process; readable at any tensor-parallel size."""
    tmp = atomic_dir(path)
    dist_checkpointing.save({k: ShardedTensor.from_rank_offsets(k, v.contiguous(), replica_id=0)
                             for k, v in sd.items()}, tmp)
    write_header(tmp, header)
    commit_dir(tmp, path)


def load_full(path: str) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint in full, in its stored dtype (one process, CPU)."""
    meta = dist_checkpointing.load_tensors_metadata(path)
    request = {k: ShardedTensor.from_rank_offsets(k, torch.empty(v.global_shape, dtype=v.dtype), replica_id=0)
               for k, v in meta.items()}
    return dist_checkpointing.load(request, path)
