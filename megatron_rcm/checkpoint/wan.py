"""Wan2.1 state-dict key maps: diffusers <-> megatron-rcm, and the original Wan-AI release -> diffusers.

Our model fuses the self-attention q/k/v projections into one weight ordered (head, {q,k,v}, channel) and the
cross-attention k/v into one ordered (head, {k,v}, channel), so a tensor-parallel rank's row slice holds whole
heads. Everything else is a rename.
"""

import re

import torch

# per-block renames, ours -> diffusers (the fused projections are handled separately)
_BLOCK_RENAMES = {
    "self_attention.q_norm": "attn1.norm_q.weight",
    "self_attention.k_norm": "attn1.norm_k.weight",
    "self_attention.linear_proj.weight": "attn1.to_out.0.weight",
    "self_attention.linear_proj.bias": "attn1.to_out.0.bias",
    "cross_attention.linear_q.weight": "attn2.to_q.weight",
    "cross_attention.linear_q.bias": "attn2.to_q.bias",
    "cross_attention.q_norm": "attn2.norm_q.weight",
    "cross_attention.k_norm": "attn2.norm_k.weight",
    "cross_attention.linear_proj.weight": "attn2.to_out.0.weight",
    "cross_attention.linear_proj.bias": "attn2.to_out.0.bias",
    "cross_attention_norm.weight": "norm2.weight",
    "cross_attention_norm.bias": "norm2.bias",
    "mlp.linear_fc1.weight": "ffn.net.0.proj.weight",
    "mlp.linear_fc1.bias": "ffn.net.0.proj.bias",
    "mlp.linear_fc2.weight": "ffn.net.2.weight",
    "mlp.linear_fc2.bias": "ffn.net.2.bias",
    "modulation": "scale_shift_table",
}
# fused ours -> (diffusers parts in order)
_BLOCK_FUSED = {
    "self_attention.linear_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attention.linear_kv": ("attn2.to_k", "attn2.to_v"),
}
_TOP_RENAMES = {
    "patch_embedding.weight": "patch_embedding.weight",
    "patch_embedding.bias": "patch_embedding.bias",
    "time_embedding.linear_1.weight": "condition_embedder.time_embedder.linear_1.weight",
    "time_embedding.linear_1.bias": "condition_embedder.time_embedder.linear_1.bias",
    "time_embedding.linear_2.weight": "condition_embedder.time_embedder.linear_2.weight",
    "time_embedding.linear_2.bias": "condition_embedder.time_embedder.linear_2.bias",
    "time_projection.weight": "condition_embedder.time_proj.weight",
    "time_projection.bias": "condition_embedder.time_proj.bias",
    "text_embedding.linear_1.weight": "condition_embedder.text_embedder.linear_1.weight",
    "text_embedding.linear_1.bias": "condition_embedder.text_embedder.linear_1.bias",
    "text_embedding.linear_2.weight": "condition_embedder.text_embedder.linear_2.weight",
    "text_embedding.linear_2.bias": "condition_embedder.text_embedder.linear_2.bias",
    "head.weight": "proj_out.weight",
    "head.bias": "proj_out.bias",
    "head_modulation": "scale_shift_table",
}

# original Wan-AI release -> diffusers (Wan-Video/Wan2.1 module names); its norm3 is the cross-attention norm
_ORIGINAL_TOP = {
    "patch_embedding.": "patch_embedding.",
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "head.head.": "proj_out.",
    "head.modulation": "scale_shift_table",
}
_ORIGINAL_BLOCK = {
    "self_attn.q.": "attn1.to_q.", "self_attn.k.": "attn1.to_k.", "self_attn.v.": "attn1.to_v.",
    "self_attn.o.": "attn1.to_out.0.", "self_attn.norm_q.": "attn1.norm_q.", "self_attn.norm_k.": "attn1.norm_k.",
    "cross_attn.q.": "attn2.to_q.", "cross_attn.k.": "attn2.to_k.", "cross_attn.v.": "attn2.to_v.",
    "cross_attn.o.": "attn2.to_out.0.", "cross_attn.norm_q.": "attn2.norm_q.", "cross_attn.norm_k.": "attn2.norm_k.",
    "norm3.": "norm2.",
    "ffn.0.": "ffn.net.0.proj.", "ffn.2.": "ffn.net.2.",
    "modulation": "scale_shift_table",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _interleave(parts: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """[n x (heads*d, ...)] -> (heads, n, d, ...) flattened: each head's q, k, v rows side by side."""
    return torch.stack([p.unflatten(0, (num_heads, -1)) for p in parts], dim=1).flatten(0, 2)


def _deinterleave(fused: torch.Tensor, n: int, num_heads: int) -> list[torch.Tensor]:
    split = fused.unflatten(0, (num_heads, n, -1))
    return [split[:, i].flatten(0, 1).contiguous() for i in range(n)]


def mcore_to_hf(sd: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """Full (unsharded) megatron-rcm Wan state dict -> diffusers WanTransformer3DModel state dict."""
    out = {}
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m is None:
            if key not in _TOP_RENAMES:
                raise KeyError(f"unexpected tensor {key!r} in a Wan checkpoint")
            out[_TOP_RENAMES[key]] = value
            continue
        i, rest = m.groups()
        stem, _, leaf = rest.rpartition(".")
        if stem in _BLOCK_FUSED:
            parts = _BLOCK_FUSED[stem]
            for name, part in zip(parts, _deinterleave(value, len(parts), num_heads)):
                out[f"blocks.{i}.{name}.{leaf}"] = part
        elif rest in _BLOCK_RENAMES:
            out[f"blocks.{i}.{_BLOCK_RENAMES[rest]}"] = value
        else:
            raise KeyError(f"unexpected tensor {key!r} in a Wan checkpoint")
    return out


def hf_to_mcore(sd: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """diffusers WanTransformer3DModel state dict -> full megatron-rcm state dict."""
    sd = dict(sd)
    out = {}
    inv_top = {v: k for k, v in _TOP_RENAMES.items()}
    inv_block = {v: k for k, v in _BLOCK_RENAMES.items()}
    blocks = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))})
    for i in blocks:
        for ours, parts in _BLOCK_FUSED.items():
            for leaf in ("weight", "bias"):
                names = [f"blocks.{i}.{p}.{leaf}" for p in parts]
                missing = [n for n in names if n not in sd]
                if missing:
                    raise KeyError(f"missing tensor(s) {missing} in the diffusers Wan checkpoint")
                out[f"blocks.{i}.{ours}.{leaf}"] = _interleave([sd.pop(n) for n in names], num_heads)
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m is None:
            if key not in inv_top:
                raise KeyError(f"unexpected tensor {key!r} in the diffusers Wan checkpoint")
            out[inv_top[key]] = value
        else:
            i, rest = m.groups()
            if rest not in inv_block:
                raise KeyError(f"unexpected tensor {key!r} in the diffusers Wan checkpoint")
            out[f"blocks.{i}.{inv_block[rest]}"] = value
    return out


def original_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan-AI release (Wan-Video/Wan2.1) state dict -> diffusers names."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("model.diffusion_model.")
        m = _BLOCK_KEY.match(key)
        table, prefix, rest = (_ORIGINAL_TOP, "", key) if m is None else (_ORIGINAL_BLOCK, f"blocks.{m.group(1)}.", m.group(2))
        for src, dst in table.items():
            if rest.startswith(src):
                out[prefix + dst + rest[len(src):]] = value
                break
        else:
            raise KeyError(f"unexpected tensor {key!r} in the original Wan checkpoint")
    return out


def looks_original(keys) -> bool:
    keys = list(keys)
    return any(".self_attn." in k or k.startswith("head.head.") for k in keys)
