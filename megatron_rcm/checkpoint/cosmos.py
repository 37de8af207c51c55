"""Cosmos-Predict2 state-dict key maps: diffusers <-> megatron-rcm, and the original NVIDIA release <-> diffusers.

As for Wan, our model fuses the self-attention q/k/v projections into one weight ordered (head, {q,k,v}, channel)
and the cross-attention k/v into one ordered (head, {k,v}, channel); everything else is a rename. Cosmos has no
biases, so only `.weight` tensors exist.

The original release (the `model.pt` of the nvidia/Cosmos-Predict2-* repositories; the names diffusers' Cosmos 2.0
converter maps) prefixes every key with `net.`; its training counters and RoPE buffers are not weights and are
dropped on import.
"""

import re

import torch

from megatron_rcm.checkpoint.keymap import KeyMap

# per-block renames, ours -> diffusers (the fused projections are handled separately)
_BLOCK_RENAMES = {
    "adaln_self_attention.linear_1.weight": "norm1.linear_1.weight",
    "adaln_self_attention.linear_2.weight": "norm1.linear_2.weight",
    "adaln_cross_attention.linear_1.weight": "norm2.linear_1.weight",
    "adaln_cross_attention.linear_2.weight": "norm2.linear_2.weight",
    "adaln_mlp.linear_1.weight": "norm3.linear_1.weight",
    "adaln_mlp.linear_2.weight": "norm3.linear_2.weight",
    "self_attention.q_norm": "attn1.norm_q.weight",
    "self_attention.k_norm": "attn1.norm_k.weight",
    "self_attention.linear_proj.weight": "attn1.to_out.0.weight",
    "cross_attention.linear_q.weight": "attn2.to_q.weight",
    "cross_attention.q_norm": "attn2.norm_q.weight",
    "cross_attention.k_norm": "attn2.norm_k.weight",
    "cross_attention.linear_proj.weight": "attn2.to_out.0.weight",
    "mlp.linear_fc1.weight": "ff.net.0.proj.weight",
    "mlp.linear_fc2.weight": "ff.net.2.weight",
}
# fused ours -> (diffusers parts in order)
_BLOCK_FUSED = {
    "self_attention.linear_qkv.weight": ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"),
    "cross_attention.linear_kv.weight": ("attn2.to_k.weight", "attn2.to_v.weight"),
}
_TOP_RENAMES = {
    "patch_embedding.weight": "patch_embed.proj.weight",
    "extra_pos_embedding.pos_emb_t": "learnable_pos_embed.pos_emb_t",
    "extra_pos_embedding.pos_emb_h": "learnable_pos_embed.pos_emb_h",
    "extra_pos_embedding.pos_emb_w": "learnable_pos_embed.pos_emb_w",
    "time_embedding.linear_1.weight": "time_embed.t_embedder.linear_1.weight",
    "time_embedding.linear_2.weight": "time_embed.t_embedder.linear_2.weight",
    "time_embedding.norm": "time_embed.norm.weight",
    "head_adaln.linear_1.weight": "norm_out.linear_1.weight",
    "head_adaln.linear_2.weight": "norm_out.linear_2.weight",
    "head.weight": "proj_out.weight",
}

# original Cosmos-Predict2 release -> diffusers, after the `net.` prefix
_ORIGINAL_TOP = {
    "x_embedder.proj.1.weight": "patch_embed.proj.weight",
    "t_embedder.1.linear_1.weight": "time_embed.t_embedder.linear_1.weight",
    "t_embedder.1.linear_2.weight": "time_embed.t_embedder.linear_2.weight",
    "t_embedding_norm.weight": "time_embed.norm.weight",
    "final_layer.adaln_modulation.1.weight": "norm_out.linear_1.weight",
    "final_layer.adaln_modulation.2.weight": "norm_out.linear_2.weight",
    "final_layer.linear.weight": "proj_out.weight",
}
_ORIGINAL_BLOCK = {
    "adaln_modulation_self_attn.1.weight": "norm1.linear_1.weight",
    "adaln_modulation_self_attn.2.weight": "norm1.linear_2.weight",
    "adaln_modulation_cross_attn.1.weight": "norm2.linear_1.weight",
    "adaln_modulation_cross_attn.2.weight": "norm2.linear_2.weight",
    "adaln_modulation_mlp.1.weight": "norm3.linear_1.weight",
    "adaln_modulation_mlp.2.weight": "norm3.linear_2.weight",
    "mlp.layer1.weight": "ff.net.0.proj.weight",
    "mlp.layer2.weight": "ff.net.2.weight",
}
for _orig, _hf in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _ORIGINAL_BLOCK.update({
        f"{_orig}.q_proj.weight": f"{_hf}.to_q.weight", f"{_orig}.k_proj.weight": f"{_hf}.to_k.weight",
        f"{_orig}.v_proj.weight": f"{_hf}.to_v.weight", f"{_orig}.output_proj.weight": f"{_hf}.to_out.0.weight",
        f"{_orig}.q_norm.weight": f"{_hf}.norm_q.weight", f"{_orig}.k_norm.weight": f"{_hf}.norm_k.weight",
    })
# buffers and training counters of the original release that are not model weights
_ORIGINAL_DROPPED = re.compile(r"(^accum_|^pos_embedder\.|_extra_state$|^logvar\.)")

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


KEYMAP = KeyMap("Cosmos", _TOP_RENAMES, _BLOCK_RENAMES, _BLOCK_FUSED, hf_block_prefix="transformer_blocks")


# (sd, num_heads) -> sd: full (unsharded) megatron-rcm <-> diffusers CosmosTransformer3DModel state dicts
mcore_to_hf = KEYMAP.to_hf
hf_to_mcore = KEYMAP.from_hf


def _rename(key: str, block_key: re.Pattern, top: dict[str, str], block: dict[str, str], block_prefix: str):
    """`key` renamed by `top`, or, when `block_key` matches it, its block-relative part renamed by `block` under
    `{block_prefix}.{i}.`; None when the tables do not name it."""
    m = block_key.match(key)
    if m is None:
        return top.get(key)
    rest = block.get(m.group(2))
    return None if rest is None else f"{block_prefix}.{m.group(1)}.{rest}"


def original_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Cosmos-Predict2 release state dict (`net.`-prefixed) -> diffusers names; non-weights dropped."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("net.")
        if _ORIGINAL_DROPPED.search(key):
            continue
        name = _rename(key, _BLOCK_KEY, _ORIGINAL_TOP, _ORIGINAL_BLOCK, "transformer_blocks")
        if name is None:
            raise KeyError(f"unexpected tensor {key!r} in the original Cosmos-Predict2 checkpoint")
        out[name] = value
    return out


def hf_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> original Cosmos-Predict2 release names (weights only, `net.`-prefixed)."""
    inv_top = {v: k for k, v in _ORIGINAL_TOP.items()}
    inv_block = {v: k for k, v in _ORIGINAL_BLOCK.items()}
    out = {}
    for key, value in sd.items():
        name = _rename(key, _HF_BLOCK_KEY, inv_top, inv_block, "blocks")
        if name is None:
            raise KeyError(f"{key!r} has no name in the original Cosmos-Predict2 format")
        out["net." + name] = value
    return out

