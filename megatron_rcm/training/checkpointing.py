"""Training checkpoints: `<run_dir>/checkpoints/iter_XXXXXXX/` plus a `latest` pointer file.

Layout of one checkpoint (format `megatron-rcm-train/2`):
- `tensors/`: one megatron-core `dist_checkpointing` directory (torch_dist) with every tensor under its global
  name: `student.model.<param>`, `student.optim.exp_avg.<param>`, `student.optim.exp_avg_sq.<param>`, the same for
  `critic`, and `ema.shadow.<param>` (fp32). Parameters are ShardedTensors with their tensor-parallel offsets
  and Adam's moments are sharded like their parameters, so a checkpoint written at one TP/DP layout resumes at
  another (blocks are named by global index; context-parallel ranks hold replicas);
- `state.json` (rank 0): iteration, counters, LR schedules, optimizer hyperparameters and step counts, EMA
  counters; `ranks/rank_NNNNN.json` (one per rank): RNG states and the data loader position;
- `config.yaml` (the resolved training config) and `meta.json` (format, layout, model family and config), the
  file that marks a checkpoint directory.
Nothing here is a pickle: tensors are read through `checkpoint.io` (its `.metadata` index through a restricted
unpickler), the rest is JSON.

Atomic: everything is written into a side directory renamed into place when complete (`checkpoint.io`), and the
`latest` pointer (the bare name of a sibling `iter_*` directory) is replaced (write + fsync + os.replace) only after
that. A crash at any point leaves `latest` naming a complete checkpoint (or no `latest` at all); side directories a
crash left behind are removed by the next successful save. `keep_last` deletes only checkpoints older than the one
`latest` names.
"""

import base64
import ctypes
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from megatron_rcm.checkpoint import io

LATEST = "latest"
FORMAT = "megatron-rcm-train/2"
TENSORS = "tensors"
STATE = "state.json"
META = "meta.json"
RANKS = "ranks"
LOCK = "run.lock"
_NAME = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used as it is (damaged, missing, incompatible, or a run directory in a state that
    needs a decision). The message is one line that names the file and the way out."""


class OldFormatError(CheckpointError):
    """A checkpoint of the pickle-based format before `megatron-rcm-train/2`: refused, never a reason to fall back."""


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# ---------------------------------------------------------------------------------------------------------------
# JSON for non-tensor state: dict keys keep their type, tuples stay tuples, tensors and arrays keep their dtype
# ---------------------------------------------------------------------------------------------------------------


def to_json(obj):
    """A JSON-able form of nested dicts / lists / tuples / numbers / strings / tensors / numpy arrays that
    `from_json` turns back into the same objects."""
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_json(v) for k, v in obj.items()}
        return {"__dict__": [[to_json(k), to_json(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        return {"__tensor__": base64.b64encode(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                .decode("ascii"), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode("ascii"),
                "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training checkpoint's JSON state")


def from_json(obj):
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__dict__" in obj:
        return {from_json(k): from_json(v) for k, v in obj["__dict__"]}
    if "__tuple__" in obj:
        return tuple(from_json(v) for v in obj["__tuple__"])
    if "__tensor__" in obj:
        dtype = getattr(torch, obj["dtype"])
        raw = bytearray(base64.b64decode(obj["__tensor__"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(obj["shape"]).clone()
    if "__ndarray__" in obj:
        return np.frombuffer(base64.b64decode(obj["__ndarray__"]), dtype=np.dtype(obj["dtype"])) \
            .reshape(obj["shape"]).copy()
    return {k: from_json(v) for k, v in obj.items()}


def _write_json(file: str, data) -> None:
    with open(file, "w") as f:
        json.dump(to_json(data), f)


def _read_json(file: str):
    try:
        with open(file) as f:
            return from_json(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{file}: damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def rng_state() -> dict:
    out = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _write_pointer(directory: str, name: str) -> None:
    tmp = os.path.join(directory, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, LATEST))


def _rank_file(rank: int) -> str:
    return os.path.join(RANKS, f"rank_{rank:05d}.json")


def save(run_dir: str, iteration: int, collect_fn, rank_state: dict, meta: dict, config_yaml: str,
         keep_last: int = 0) -> str:
    """Write the checkpoint of `iteration` (every rank calls this). `collect_fn()` returns this rank's ShardedTensors
    and the JSON-able state (rank 0's is written); it may be collective (the distributed optimizer's), so every
    rank calls it. `rank_state` (every rank's) is JSON-able."""
    root = checkpoints_dir(run_dir)
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
    name = checkpoint_name(iteration)
    final = os.path.join(root, name)
    tmp = io.atomic_dir(final)
    sharded, state = collect_fn()
    if rank == 0:
        os.makedirs(os.path.join(tmp, TENSORS))
        os.makedirs(os.path.join(tmp, RANKS))
    dist.barrier()
    io.save_sharded(sharded, os.path.join(tmp, TENSORS))
    _write_json(os.path.join(tmp, _rank_file(rank)), rank_state)
    if rank == 0:
        _write_json(os.path.join(tmp, STATE), {**state, "iteration": iteration})
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
        with open(os.path.join(tmp, META), "w") as f:  # last: it marks the directory as a checkpoint
            json.dump({"format": FORMAT, **meta, "iteration": iteration, "world_size": dist.get_world_size()}, f,
                      indent=2)
    io.commit_dir(tmp, final)  # barrier, rename, barrier
    if rank == 0:
        _write_pointer(root, name)
        remove_leftovers(root)
        prune(root, keep_last)
    dist.barrier()
    return final


def remove_leftovers(root: str) -> None:
    """Side directories (`*.incomplete-*`, `*.old-*`) that a crash left behind. Only one job writes a run
    directory (`RunLock`), so none of them is being written now."""
    for d in os.listdir(root):
        if ".incomplete-" in d or ".old-" in d:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def complete_checkpoints(root: str) -> list[str]:
    """Names of the checkpoint directories (with their `meta.json`), oldest first."""
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if _NAME.match(d) and os.path.isfile(os.path.join(root, d, META))]
    return sorted(names, key=lambda d: int(_NAME.match(d).group(1)))


def prune(root: str, keep_last: int) -> list[str]:
    """Keep the `keep_last` newest checkpoints up to the one `latest` names, and everything newer than it (0: keep
    all). Returns the names deleted."""
    if keep_last <= 0:
        return []
    pointer = read_pointer(root)
    if pointer is None:
        return []  # without a pointer nothing says which checkpoint is current: delete nothing
    current = int(_NAME.match(pointer).group(1))
    older = [d for d in complete_checkpoints(root) if int(_NAME.match(d).group(1)) < current]
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for d in doomed:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------------------------------------------
# Finding and checking
# ---------------------------------------------------------------------------------------------------------------


def read_pointer(root: str) -> str | None:
    """The checkpoint name in `root/latest` (None when there is none). It must be a bare sibling `iter_*` name."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    if not _NAME.match(name):
        raise CheckpointError(f"{pointer} holds {name[:80]!r}, not the name of a sibling iter_NNNNNNN directory; fix "
                              f"it or choose a checkpoint with training.resume_from=PATH")
    return name


def verify(path: str) -> dict:
    """Check a checkpoint directory's files without loading its tensors; returns its meta. Raises CheckpointError
    (damage: one line naming the file), io.UnsafeCheckpointError (a pickle that would run code)."""
    meta_file = os.path.join(path, META)
    if any(f.startswith("mp_rank_") and f.endswith(".pt") for f in _listdir(path)):
        raise OldFormatError(f"{path} is an old-format checkpoint (per-rank torch pickles, mp_rank_*.pt), which "
                              f"cannot be read safely; start a new run (another run_dir) from the teacher")
    meta = _read_json(meta_file)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: not a {FORMAT} checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{meta_file}: damaged (not a mapping)")
    tensors = os.path.join(path, TENSORS)
    try:
        io.check_files(tensors)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    except io.UnsafeCheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    _read_json(os.path.join(path, STATE))
    for r in range(int(meta["world_size"])):
        if not os.path.isfile(os.path.join(path, _rank_file(r))):
            raise CheckpointError(f"{os.path.join(path, _rank_file(r))}: missing")
    return meta


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def resolve(run_dir: str, resume: bool = True, resume_from: str = "", fallback: bool = True,
            log=print) -> str | None:
    """The checkpoint a run continues from, or None for a fresh start. Refuses (CheckpointError) whenever
    continuing or starting over could lose work; falls back to the newest older complete checkpoint when the
    newest is damaged (with `fallback`), saying so through `log`."""
    root = checkpoints_dir(run_dir)
    existing = complete_checkpoints(root)
    choose = (f"choose one with training.resume_from=PATH, or start a new run with training.resume=false and a "
              f"new run_dir")
    if resume_from:
        verify(resume_from)
        return resume_from
    if not resume:
        if existing:
            raise CheckpointError(f"training.resume=false but {root} holds checkpoints {existing}; use a new "
                                  f"run_dir (nothing was deleted)")
        return None
    name = read_pointer(root)
    if name is None:
        if existing:
            raise CheckpointError(f"{os.path.join(root, LATEST)} is missing but complete checkpoints exist "
                                  f"({', '.join(existing)}); {choose}")
        return None
    if name not in existing:
        raise CheckpointError(f"{os.path.join(root, LATEST)} names {name}, which is not a complete checkpoint "
                              f"(complete: {', '.join(existing) or 'none'}); {choose}")
    try:
        verify(os.path.join(root, name))
        return os.path.join(root, name)
    except OldFormatError:
        raise
    except CheckpointError as e:
        if not fallback:
            raise CheckpointError(f"{e}; set training.resume_fallback=true to resume from the newest older "
                                  f"checkpoint, or {choose}") from None
        log(f"checkpoint {name} is damaged: {e}")
        newest = int(_NAME.match(name).group(1))
        for older in reversed([d for d in existing if int(_NAME.match(d).group(1)) < newest]):
            try:
                verify(os.path.join(root, older))
            except CheckpointError as e2:
                log(f"checkpoint {older} is damaged too: {e2}")
                continue
            log(f"resume_fallback: resuming from the newest complete older checkpoint {older}")
            return os.path.join(root, older)
        raise CheckpointError(f"no complete checkpoint to fall back to in {root} (newest damaged: {e}); {choose}") \
            from None


def load_state(path: str) -> tuple[dict, dict, dict | None]:
    """(meta, state, this rank's state or None when the world size changed) of a verified checkpoint."""
    meta = verify(path)
    state = _read_json(os.path.join(path, STATE))
    rank_state = None
    if meta["world_size"] == dist.get_world_size():
        rank_state = _read_json(os.path.join(path, _rank_file(dist.get_rank())))
    return meta, state, rank_state


def load_tensors(path: str, sharded: dict) -> dict:
    """The tensors `sharded` asks for (this rank's slices, any layout)."""
    return io.load_sharded(sharded, os.path.join(path, TENSORS))


def _network_prefix(network: str) -> str:
    if network == "ema":
        return "ema.shadow."
    if network in ("student", "critic"):
        return f"{network}.model."
    raise ValueError(f"network must be ema, student or critic, got {network!r}")


def read_network(path: str, network: str = "ema") -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(model family, model config dict, full state dict) of one network of a training checkpoint, read in this
    process without a process group or model-parallel layout (any TP/DP the run had). `path`: a checkpoint
    directory, or a run directory (its `checkpoints/latest`). The EMA comes in the dtypes of the student's
    parameters (what the end-of-run export writes); nothing read can run code."""
    if not os.path.isfile(os.path.join(path, META)) and os.path.isdir(checkpoints_dir(path)):
        root = checkpoints_dir(path)
        name = read_pointer(root)
        if name is None:
            raise CheckpointError(f"{root} has no {LATEST} pointer (checkpoints: "
                                  f"{', '.join(complete_checkpoints(root)) or 'none'}); pass a checkpoint directory")
        path = os.path.join(root, name)
    meta = verify(path)
    tensors = os.path.join(path, TENSORS)
    sd = io.load_full(tensors, _network_prefix(network))
    if not sd:
        raise CheckpointError(f"{tensors}: holds no {network} network")
    if network == "ema":
        dtypes = {k.removeprefix("student.model."): dt for k, (_, dt) in io.tensor_metadata(tensors).items()
                  if k.startswith("student.model.")}
        sd = {k: v.to(dtypes.get(k, v.dtype)) for k, v in sd.items()}
    return meta["model"], meta["model_config"], sd


# ---------------------------------------------------------------------------------------------------------------
# One job per run directory; workers that do not outlive their launcher
# ---------------------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive `flock` on `<run_dir>/run.lock`, held by the job's rank 0 for its lifetime (the OS releases it
    when the process dies, however it dies). The file names the holder's host and pid."""

    def __init__(self, run_dir: str):
        self.file = os.path.join(run_dir, LOCK)
        self.fd = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.file) or ".", exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown host/pid"
            os.close(fd)
            raise CheckpointError(f"{os.path.dirname(self.file)} is in use by another job ({holder}; lock file "
                                  f"{self.file}); wait for it to end or use another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_PR_SET_PDEATHSIG = 1


def die_with_parent(poll_s: float = 1.0) -> None:
    """Make this process exit when the process that started it (torchrun's agent) dies, even by SIGKILL: the
    kernel's parent-death signal (Linux prctl) plus a thread that watches the parent pid (other systems, and the
    window before prctl took effect)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch():
        while True:
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(poll_s)

    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
