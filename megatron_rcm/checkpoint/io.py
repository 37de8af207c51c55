"""megatron-rcm model checkpoints: megatron-core `dist_checkpointing` (torch_dist backend) + a JSON header.

Each parameter is saved as a ShardedTensor under its global name with its tensor-parallel slice offsets, so a
checkpoint written at one TP size loads at any other. Writes go to a side directory that is renamed into place
only when complete: a crash never leaves something that looks like a checkpoint.

Safety: the torch_dist format keeps one pickle, `.metadata` (the global index of shards), which torch's
`FileSystemReader.read_metadata` reads with a plain `pickle.load`, and megatron-core's `dist_checkpointing.load`
also unpickles its "common state" object with `weights_only=False`. Every read of ours therefore (1) loads
`.metadata` through `SafeUnpickler`, which admits only the classes that index is made of and names the file on
anything else, before any library code opens it, and (2) requests tensors only (tensors are read with
`torch.load(weights_only=True)`), never the common-state object: nothing a checkpoint holds can run code.
"""

import contextlib
import io as _io
import json
import os
import pickle
import shutil
import uuid

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

from megatron_rcm.parallel import state

HEADER = "megatron_rcm.json"
FORMAT = "megatron-rcm-model/1"
METADATA = ".metadata"
"""The torch_dist index file (a pickle) of a dist_checkpointing directory."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than what its format needs (possibly code)."""


# Everything a torch_dist `.metadata` is made of (torch 2.x): the index dataclasses, torch.Size, dtypes, the layout
# and memory-format decoders, the checkpoint's path. Anything else (os.system, builtins.eval, ...) is refused.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "TensorWriteData", "WriteItem", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # the writer's checkpoint id
    "pathlib._local": {"PosixPath", "PurePosixPath"},
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch_dist `.metadata`; any global outside `_ALLOWED` (and torch dtypes) is refused."""

    def __init__(self, file, name: str):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"{self.name}: refusing to load {module}.{name} (not part of the torch_dist "
                                    f"index format; the file may run code - do not use this checkpoint)")


def read_metadata(path: str):
    """The torch_dist index of dist_checkpointing directory `path`, unpickled safely."""
    file = os.path.join(path, METADATA)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: missing (not a complete dist_checkpointing directory)") from None
    try:
        return SafeUnpickler(_io.BytesIO(data), file).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated / damaged
        raise ValueError(f"{file}: damaged ({type(e).__name__}: {e})") from None


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def sharded_state_dict(model: torch.nn.Module, prefix: str = "", tensors: dict | None = None,
                       keep_vars: bool = False) -> dict:
    """ShardedTensors for every parameter of `model` (or for `tensors`, shaped like the parameters, only those
    named). `keep_vars`: the parameters themselves as data (megatron's distributed optimizer finds its parameters
    in a model's sharded state dict by identity).

    Replica ids: 0 marks the one copy that is written; tensor-parallel-replicated parameters are copies on the
    other TP ranks, every parameter is replicated across data-parallel (and context-parallel) ranks, and the small
    modules every pipeline stage holds (`pipeline_replicated`) are written by the first stage only."""
    tp, tp_rank = state.tp_size(), state.tp_rank()
    dp_rank = state.dp_rank() * state.cp_size() + state.cp_rank()
    pp_rank = state.pp_rank()
    out = {}
    for name, p in model.named_parameters():
        if tensors is not None and name not in tensors:
            continue
        data = (p if keep_vars else p.detach()) if tensors is None else tensors[name]
        key = prefix + name
        stage = pp_rank if getattr(p, "pipeline_replicated", False) else 0
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            out[key] = ShardedTensor.from_rank_offsets(key, data, (p.partition_dim, tp_rank, tp),
                                                       replica_id=(stage, 0, dp_rank))
        else:
            out[key] = ShardedTensor.from_rank_offsets(key, data, replica_id=(stage, tp_rank, dp_rank))
    return out


@contextlib.contextmanager
def _process_group():
    """A one-process group while none exists (converters, `read_network`): megatron's ShardedTensor translation
    asks for the rank."""
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


def save_sharded(sharded: dict, path: str) -> None:
    """Write ShardedTensors (every rank calls this with its shards) into the empty directory `path`, in
    dist_checkpointing's torch_dist format, synchronously in this process.

    `dist_checkpointing.save` hands the write to a spawned writer process; starting it costs seconds per process on a
    small CPU machine, longer than the write of a small model. The same format
    (shards, `.metadata`, `metadata.json`) is written here with torch's synchronous FileSystemWriter."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    with _process_group():
        distributed = dist.get_world_size() > 1
        sharded, common = save_preprocess(dict(sharded), validate_access_integrity=distributed)
        # the (empty) common state megatron's own loader expects; ours never reads it
        sharded["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=dist.get_rank())
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded)
        dcp_save(mcore_to_pyt_state_dict(flat, False), storage_writer=FileSystemWriter(path, thread_count=1),
                 planner=MCoreSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                 no_dist=not distributed)
        if dist.get_rank() == 0:
            save_config(CheckpointingConfig("torch_dist", 1), path)
        _barrier()


def tensor_metadata(path: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """{key: (global shape, dtype)} of the tensors of a dist_checkpointing directory (from its safe index)."""
    return _tensors_of(read_metadata(path))


def _tensors_of(meta) -> dict[str, tuple[tuple, torch.dtype]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def check_files(path: str, meta=None) -> None:
    """Every data file the index names exists and is long enough: a missing or truncated file is named."""
    meta = meta if meta is not None else read_metadata(path)
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: missing (the checkpoint's index names it)")
        if os.path.getsize(file) < size:
            raise ValueError(f"{file}: truncated ({os.path.getsize(file)} of {size} bytes)")


def load_sharded(sharded: dict, path: str) -> dict:
    """Read the ShardedTensors `sharded` (any layout: each rank asks for its slices) from `path`; returns
    {key: tensor}. Tensors only: megatron's common-state object (a pickle) is never read. Errors name the file."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from torch.distributed.checkpoint.api import CheckpointException

    meta = read_metadata(path)  # the safe read of `.metadata`, before the library unpickles it
    stored = _tensors_of(meta)
    missing = sorted(sh.key for sh in sharded.values() if sh.key not in stored)
    if missing:
        raise KeyError(f"{path}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                       f"({len(missing)} in all)")
    check_files(path, meta)
    try:
        with _process_group():
            return TorchDistLoadShardedStrategy().load(dict(sharded), path)
    except (Exception, CheckpointException) as e:  # damaged data the size check cannot see
        raise ValueError(f"{path}: damaged checkpoint data ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        _fsync_dir(os.path.dirname(os.path.abspath(final)))
    _barrier()


def save_model(model: torch.nn.Module, path: str, header: dict) -> None:
    """Save `model` (all ranks call this) to directory `path`."""
    tmp = atomic_dir(path)
    save_sharded(sharded_state_dict(model), tmp)
    if _is_rank0():
        write_header(tmp, header)
    commit_dir(tmp, path)


def tensor_shapes(path: str) -> dict[str, tuple]:
    """Global shapes of the tensors stored in a dist_checkpointing directory (read from its metadata)."""
    return {k: shape for k, (shape, _) in tensor_metadata(path).items()}


@torch.no_grad()
def load_model(model: torch.nn.Module, path: str) -> None:
    """Load parameters saved by `save_model` (at any tensor-parallel size) into `model`."""
    from megatron_rcm.checkpoint.sharding import check_state_dict

    shapes = tensor_shapes(path)
    check_state_dict(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, f"checkpoint {path}")
    empty = {n: torch.empty_like(p) for n, p in model.named_parameters()}
    loaded = load_sharded(sharded_state_dict(model, tensors=empty), path)
    for name, p in model.named_parameters():
        p.copy_(loaded[name])


def save_full(sd: dict[str, torch.Tensor], path: str, header: dict) -> None:
    """Save full (unsharded) tensors from one process; readable at any tensor-parallel size."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("save_full writes from one process; call it without a multi-rank process group")
    tmp = atomic_dir(path)
    save_sharded({k: ShardedTensor.from_rank_offsets(k, v.contiguous(), replica_id=0) for k, v in sd.items()}, tmp)
    write_header(tmp, header)
    commit_dir(tmp, path)


def load_full(path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Read every tensor (or those whose key starts with `prefix`, returned without it) of a checkpoint in full, in
    its stored dtype (one process, CPU, no process group needed)."""
    request = {k[len(prefix):]: ShardedTensor.from_rank_offsets(k, torch.empty(shape, dtype=dtype), replica_id=0)
               for k, (shape, dtype) in tensor_metadata(path).items() if k.startswith(prefix)}
    return load_sharded(request, path)
