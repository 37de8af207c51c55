"""The negative prompt's text embedding file (`data.negative_text_embedding`): one `[L, text_dim]` tensor, as a
`.pt` holding just that tensor (what the rCM reference's `neg_embed_path` holds) or a `.safetensors` file with it
under `negative_text_embedding`. Neither can run code when read."""

import os

import torch

from megatron_rcm.checkpoint.pickles import load_weights_only

SAFETENSORS_KEY = "negative_text_embedding"


def save_negative_embedding(embedding: torch.Tensor, path: str) -> None:
    """Write `embedding` ([L, text_dim]) to `path` (.pt or .safetensors), atomically (a side file renamed into
    place)."""
    if embedding.ndim != 2:
        raise ValueError(f"the negative prompt's embedding must be [L, text_dim], got {tuple(embedding.shape)}")
    tmp = f"{path}.incomplete-{os.getpid()}"
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({SAFETENSORS_KEY: embedding.contiguous()}, tmp)
        else:
            torch.save(embedding.contiguous().clone(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_negative_embedding(path: str) -> torch.Tensor:
    """The `[L, text_dim]` embedding in `path` (.safetensors, or a torch file read with weights_only=True)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            if SAFETENSORS_KEY not in f.keys():
                raise ValueError(f"{path} has no tensor {SAFETENSORS_KEY!r} (it has {list(f.keys())[:4]})")
            t = f.get_tensor(SAFETENSORS_KEY)
    else:
        t = load_weights_only(path)
    if not isinstance(t, torch.Tensor) or t.ndim not in (2, 3) or (t.ndim == 3 and t.shape[0] != 1):
        raise ValueError(f"{path} does not hold a negative prompt embedding [L, text_dim] (got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__})")
    return t[0] if t.ndim == 3 else t
