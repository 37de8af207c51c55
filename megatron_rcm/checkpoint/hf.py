"""Reading and writing Hugging Face diffusers model folders (config.json + safetensors, sharded or not)."""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


def resolve_model_dir(path: str, subfolder: str = "transformer") -> str:
    """A diffusers pipeline folder (with model_index.json) resolves to its `transformer` folder."""
    if os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isdir(os.path.join(path, subfolder)):
        return os.path.join(path, subfolder)
    return path


def read_config(path: str) -> dict | None:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    return [os.path.join(path, f) for f in files]


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    files = safetensors_files(path)
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in out:
                    raise ValueError(f"tensor {key!r} appears in more than one shard of {path}")
                out[key] = f.get_tensor(key)
    return out


def write_model_dir(path: str, sd: dict[str, torch.Tensor], config: dict, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors into an existing (side) directory; shards above `max_shard_bytes`."""
    shards, current, size = [], {}, 0
    for key in sorted(sd):
        t = sd[key].contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
