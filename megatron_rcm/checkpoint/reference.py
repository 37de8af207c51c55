"""Files of the rCM reference implementation (NVlabs/rcm): its released students (`rCM_Wan2.1_T2V_*.pt`) and the
Wan2.1 teacher `.pth` files it trains from.

Both are plain torch state dicts of the reference's `WanModel`: Wan-Video's original module names, except that
`patch_embedding` is an `nn.Linear` over patchified tokens whose features are ordered (channel, kt, kh, kw) - the
Conv3d weight of the original layout flattened, so reshaping it back is exact. Keys carry the training model's
prefixes: `net.` (the student, or the EMA renamed by the reference's DCP -> .pth script, as in the released files)
and `net_ema.` (the EMA, in a full training-state dump); teacher files have none. There is no config: the
architecture is read from the tensor shapes (Wan2.1 heads are 128 wide) unless a preset names it.
"""

import os

import torch

from megatron_rcm.checkpoint.pickles import load_weights_only

SUFFIXES = (".pt", ".pth")
PREFIXES = {"ema": "net_ema.", "net": "net."}
WAN_HEAD_DIM = 128
PATCH_SIZE = (1, 2, 2)


def is_reference_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(SUFFIXES)


def load_file(path: str) -> dict[str, torch.Tensor]:
    """The file's tensors (under its `model` key if it has one), unpickled with `weights_only=True` (a pickle
    that would run code is refused)."""
    sd = load_weights_only(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def select_network(sd: dict[str, torch.Tensor], network: str | None, source: str) -> dict[str, torch.Tensor]:
    """The tensors of one network without its prefix. `network`: 'ema' (`net_ema.`), 'net' (`net.`) or None (the
    EMA if the file has one, else `net.`, else an unprefixed teacher file)."""
    present = [name for name, prefix in PREFIXES.items() if any(k.startswith(prefix) for k in sd)]
    if network is None:
        network = "ema" if "ema" in present else ("net" if "net" in present else None)
    elif network not in PREFIXES:
        raise ValueError(f"unknown network {network!r}: use 'ema' or 'net'")
    elif network not in present:
        have = ", ".join(f"{PREFIXES[p]}* (--{p})" for p in present) or "no net./net_ema. prefixes (a teacher file)"
        raise ValueError(f"{source} has no {PREFIXES[network]}* tensors; it has {have}")
    if network is None:
        return dict(sd)
    prefix = PREFIXES[network]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def to_original(sd: dict[str, torch.Tensor], patch_size=PATCH_SIZE) -> dict[str, torch.Tensor]:
    """Reference names -> Wan-Video original names (the Linear patch embedding back to its Conv3d shape)."""
    out = dict(sd)
    w = out.get("patch_embedding.weight")
    if w is not None and w.ndim == 2:
        n = patch_size[0] * patch_size[1] * patch_size[2]
        if w.shape[1] % n:
            raise ValueError(f"patch_embedding.weight {tuple(w.shape)} is not a Linear over {patch_size} patches")
        out["patch_embedding.weight"] = w.reshape(w.shape[0], w.shape[1] // n, *patch_size)
    return out


def config_fields(sd: dict[str, torch.Tensor], source: str) -> dict:
    """WanConfig fields read from the shapes of a reference state dict (prefix removed)."""
    try:
        w = sd["patch_embedding.weight"]
        dim = w.shape[0]
        patch = PATCH_SIZE[0] * PATCH_SIZE[1] * PATCH_SIZE[2]
        in_channels = w.shape[1] // patch if w.ndim == 2 else w.shape[1]
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        fields = dict(ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_layers=layers, in_channels=in_channels,
                      out_channels=sd["head.head.weight"].shape[0] // patch,
                      text_dim=sd["text_embedding.0.weight"].shape[1],
                      freq_dim=sd["time_embedding.0.weight"].shape[1])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source} is not a Wan2.1 state dict of the rCM reference (missing {e})") from None
    if dim % WAN_HEAD_DIM:
        raise ValueError(f"{source}: width {dim} is not a multiple of Wan's head width {WAN_HEAD_DIM}; name the "
                         f"architecture with a preset")
    return dict(num_attention_heads=dim // WAN_HEAD_DIM, attention_head_dim=WAN_HEAD_DIM, **fields)
