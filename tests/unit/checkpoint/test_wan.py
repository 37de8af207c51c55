"""checkpoint/wan.py: the diffusers <-> megatron-rcm key map of Wan2.1 (fused per-head projections) and the original
Wan-AI release's names."""

import json
import os
import sys

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from megatron_rcm.checkpoint import wan as wan_keys
from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models import from_pretrained
from megatron_rcm.models.wan import PRESETS, WanModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
from wan_reference import diffusers_wan, megatron_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    ref = diffusers_wan()
    ours = WanModel(PRESETS["wan-tiny"])
    load_full_state_dict(ours, megatron_state_dict(ref))
    return ref, ours


def test_diffusers_names_round_trip_and_fuse_whole_heads(pair):
    """Every diffusers tensor maps to one of ours and back unchanged; a fused projection holds each head's q, k, v
    rows side by side (so a tensor-parallel row slice is whole heads)."""
    ref, ours = pair
    hf_sd, heads = ref.state_dict(), ref.config.num_attention_heads
    mine = wan_keys.hf_to_mcore(hf_sd, heads)
    assert set(mine) == set(dict(ours.named_parameters()))
    back = wan_keys.mcore_to_hf(mine, heads)
    assert set(back) == set(hf_sd) and all(torch.equal(back[k], v) for k, v in hf_sd.items())
    d = ref.config.attention_head_dim
    qkv = mine["blocks.1.self_attention.linear_qkv.weight"]
    for h in range(heads):
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            rows = qkv[(3 * h + i) * d:(3 * h + i + 1) * d]
            assert torch.equal(rows, hf_sd[f"blocks.1.attn1.{part}.weight"][h * d:(h + 1) * d]), (h, part)
    with pytest.raises(KeyError, match="unexpected tensor 'blocks.0.surprise'"):
        wan_keys.mcore_to_hf({"blocks.0.surprise": torch.zeros(1)}, heads)


# original Wan-AI release names, written from Wan-Video/Wan2.1's module layout (independent of our key maps);
# diffusers' own single-file converter checks it below
def to_original(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        k = (k.replace("condition_embedder.time_embedder.linear_1", "time_embedding.0")
             .replace("condition_embedder.time_embedder.linear_2", "time_embedding.2")
             .replace("condition_embedder.text_embedder.linear_1", "text_embedding.0")
             .replace("condition_embedder.text_embedder.linear_2", "text_embedding.2")
             .replace("condition_embedder.time_proj", "time_projection.1")
             .replace("attn1", "self_attn").replace("attn2", "cross_attn").replace(".to_out.0.", ".o.")
             .replace(".to_q.", ".q.").replace(".to_k.", ".k.").replace(".to_v.", ".v.")
             .replace("ffn.net.0.proj", "ffn.0").replace("ffn.net.2", "ffn.2").replace("proj_out", "head.head")
             .replace(".norm2.", ".norm3."))
        if k == "scale_shift_table":
            k = "head.modulation"
        k = k.replace("scale_shift_table", "modulation")
        out["model.diffusion_model." + k] = v
    return out


def test_original_release_import_equals_diffusers(tmp_path, pair):
    ref, ours = pair
    original = to_original(ref.state_dict())
    assert any(".norm3." in k for k in original)
    # diffusers' own single-file converter agrees that this is the original layout
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    (tmp_path / "orig").mkdir()
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "orig" / "model.safetensors")
    cfg = PRESETS["wan-tiny"]
    (tmp_path / "orig" / "config.json").write_text(json.dumps(dict(
        model_type="t2v", dim=cfg.hidden_size, num_heads=cfg.num_attention_heads, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, in_dim=cfg.in_channels, out_dim=cfg.out_channels, freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim, eps=cfg.eps)))
    net = from_pretrained(str(tmp_path / "orig"), params_dtype=torch.float32)
    expected = dict(ours.named_parameters())
    for name, p in net.named_parameters():
        assert torch.equal(p, expected[name]), name
