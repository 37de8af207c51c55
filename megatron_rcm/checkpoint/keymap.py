"""Explicit rename maps between megatron-rcm parameter names and diffusers names.

Our attention fuses per-projection weights into one tensor laid out per head ((head, {q,k,v}, channel) for
self-attention, (head, {k,v}, channel) for cross-attention), so that a tensor-parallel rank's row slice holds
whole heads; everything else is a rename. A model family gives its renames; this module applies them.
"""

import dataclasses
import re

import torch

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def interleave(parts: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """[n x (heads*d, ...)] -> (heads, n, d, ...) flattened: each head's q, k, v rows side by side."""
    return torch.stack([p.unflatten(0, (num_heads, -1)) for p in parts], dim=1).flatten(0, 2)


def deinterleave(fused: torch.Tensor, n: int, num_heads: int) -> list[torch.Tensor]:
    split = fused.unflatten(0, (num_heads, n, -1))
    return [split[:, i].flatten(0, 1).contiguous() for i in range(n)]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """ours -> diffusers names. `block` and `fused` are relative to block i (`blocks.{i}.` on our side,
    `{hf_block_prefix}.{i}.` on diffusers')."""

    family: str
    """Model family for error messages."""
    top: dict[str, str]
    """Tensors outside the blocks."""
    block: dict[str, str]
    """Per-block renames."""
    fused: dict[str, tuple[str, ...]]
    """Per-block fused tensors -> the diffusers tensors they interleave, in order."""
    hf_block_prefix: str = "blocks"

    def to_hf(self, sd: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
        """Full (unsharded) megatron-rcm state dict -> diffusers state dict."""
        out = {}
        for key, value in sd.items():
            m = _BLOCK_KEY.match(key)
            if m is None:
                if key not in self.top:
                    raise KeyError(f"unexpected tensor {key!r} in a {self.family} checkpoint")
                out[self.top[key]] = value
                continue
            i, rest = m.groups()
            prefix = f"{self.hf_block_prefix}.{i}."
            if rest in self.fused:
                parts = self.fused[rest]
                for name, part in zip(parts, deinterleave(value, len(parts), num_heads)):
                    out[prefix + name] = part
            elif rest in self.block:
                out[prefix + self.block[rest]] = value
            else:
                raise KeyError(f"unexpected tensor {key!r} in a {self.family} checkpoint")
        return out

    def from_hf(self, sd: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
        """diffusers state dict -> full megatron-rcm state dict."""
        sd = dict(sd)
        out = {}
        hf_block = re.compile(rf"^{re.escape(self.hf_block_prefix)}\.(\d+)\.(.+)$")
        inv_top = {v: k for k, v in self.top.items()}
        inv_block = {v: k for k, v in self.block.items()}
        for i in sorted({int(m.group(1)) for k in sd if (m := hf_block.match(k))}):
            prefix = f"{self.hf_block_prefix}.{i}."
            for ours, parts in self.fused.items():
                names = [prefix + p for p in parts]
                missing = [n for n in names if n not in sd]
                if missing:
                    raise KeyError(f"missing tensor(s) {missing} in the diffusers {self.family} checkpoint")
                out[f"blocks.{i}.{ours}"] = interleave([sd.pop(n) for n in names], num_heads)
        for key, value in sd.items():
            m = hf_block.match(key)
            name = inv_top.get(key) if m is None else (
                f"blocks.{m.group(1)}.{inv_block[m.group(2)]}" if m.group(2) in inv_block else None)
            if name is None:
                raise KeyError(f"unexpected tensor {key!r} in the diffusers {self.family} checkpoint")
            out[name] = value
        return out
