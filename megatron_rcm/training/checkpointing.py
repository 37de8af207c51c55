"""Training checkpoints: `<run_dir>/checkpoints/iter_XXXXXXX/` plus a `latest` pointer file.

Layout of one checkpoint:
- `mp_rank_TT_PPP_CC.pt` (one per tensor/pipeline/context-parallel rank, written by its data-parallel rank 0):
  student, critic (weights, optimizer, LR schedule), EMA;
- `rank_NNNNN.pt` (one per rank): RNG states and the data loader position;
- `meta.json` (iteration, consumed samples, parallel layout, model config) and `config.yaml` (the resolved
  training config).
Atomic: everything is written into a side directory renamed into place when complete (`checkpoint.io`), and the
`latest` pointer is replaced (write + fsync + os.replace) only after that. A crash at any point leaves `latest`
naming a complete checkpoint (or no `latest` at all).
"""

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megatron_rcm.checkpoint import io
from megatron_rcm.parallel import state

LATEST = "latest"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _mp_file() -> str:
    return f"mp_rank_{state.tp_rank():02d}_{state.pp_rank():03d}_{state.cp_rank():02d}.pt"


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rng_state() -> dict:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"])


def _write_pointer(directory: str, name: str) -> None:
    tmp = os.path.join(directory, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, LATEST))


def save(run_dir: str, iteration: int, mp_state_fn, rank_state: dict, meta: dict, config_yaml: str,
         keep_last: int = 0) -> str:
    """Write the checkpoint of `iteration` (every rank calls this). `mp_state_fn()` returns this model-parallel
    rank's state; it may be collective (the distributed optimizer gathers), so every rank calls it."""
    root = checkpoints_dir(run_dir)
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
    name = f"iter_{iteration:07d}"
    final = os.path.join(root, name)
    tmp = io.atomic_dir(final)
    mp_state = mp_state_fn()
    if state.dp_rank() == 0:
        torch.save(mp_state, os.path.join(tmp, _mp_file()))
    torch.save(rank_state, os.path.join(tmp, _rank_file(rank)))
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "iteration": iteration, "world_size": dist.get_world_size()}, f, indent=2)
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
    io.commit_dir(tmp, final)  # barrier, rename, barrier
    if rank == 0:
        _write_pointer(root, name)
        if keep_last > 0:
            old = sorted(d for d in os.listdir(root) if d.startswith("iter_") and "." not in d)[:-keep_last]
            for d in old:
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def latest(run_dir: str) -> str | None:
    """The directory `latest` points to, or None when the run has no checkpoint yet."""
    root = checkpoints_dir(run_dir)
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise RuntimeError(f"{pointer} names {name!r}, which is not a complete checkpoint")
    return path


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def load(path: str) -> tuple[dict, dict | None, dict]:
    """(this model-parallel rank's state, this rank's state or None when the world size changed, meta)."""
    meta = read_meta(path)
    layout = meta["parallel"]
    here = {"tensor_model_parallel_size": state.tp_size(), "pipeline_model_parallel_size": state.pp_size(),
            "context_parallel_size": state.cp_size()}
    if layout != here:
        raise ValueError(f"checkpoint {path} was written with model-parallel layout {layout}; this run has {here} "
                         f"(only the data-parallel size may change on resume)")
    mp_state = torch.load(os.path.join(path, _mp_file()), map_location="cpu", weights_only=False)
    rank_file = os.path.join(path, _rank_file(dist.get_rank()))
    rank_state = None
    if meta["world_size"] == dist.get_world_size() and os.path.isfile(rank_file):
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return mp_state, rank_state, meta
