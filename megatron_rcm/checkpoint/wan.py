"""Wan2.1 state-dict key maps: diffusers <-> megatron-rcm (see keymap.py), and the original Wan-AI release ->
diffusers."""

import re

import torch

from megatron_rcm.checkpoint.keymap import KeyMap

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
    f"{ours}.{leaf}": tuple(f"{p}.{leaf}" for p in parts)
    for ours, parts in (("self_attention.linear_qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
                        ("cross_attention.linear_kv", ("attn2.to_k", "attn2.to_v")))
    for leaf in ("weight", "bias")
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


KEYMAP = KeyMap("Wan", _TOP_RENAMES, _BLOCK_RENAMES, _BLOCK_FUSED)


# (sd, num_heads) -> sd: full (unsharded) megatron-rcm <-> diffusers WanTransformer3DModel state dicts
mcore_to_hf = KEYMAP.to_hf
hf_to_mcore = KEYMAP.from_hf


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

