"""checkpoint/keymap.py: fused projections interleaved per head, and a family's renames both ways (a made-up family:
the Wan and Cosmos maps are checked against diffusers in test_wan.py / test_cosmos.py)."""

import re

import pytest
import torch

from megatron_rcm.checkpoint.keymap import KeyMap, deinterleave, interleave

TOY = KeyMap("Toy", top={"head.weight": "proj_out.weight"}, block={"norm.weight": "norm1.weight"},
             fused={"qk.weight": ("attn.to_q.weight", "attn.to_k.weight")}, hf_block_prefix="layers")


def test_interleave_puts_each_heads_rows_side_by_side():
    q = torch.arange(24.0).reshape(6, 4)  # 2 heads of 3 rows
    k, v = q + 100, q + 200
    fused = interleave([q, k, v], num_heads=2)
    assert torch.equal(fused, torch.cat([q[:3], k[:3], v[:3], q[3:], k[3:], v[3:]]))
    back = deinterleave(fused, 3, num_heads=2)
    assert all(torch.equal(a, b) and a.is_contiguous() for a, b in zip(back, (q, k, v)))
    bias = interleave([torch.arange(4.0), torch.arange(4.0) + 10], num_heads=2)
    assert bias.tolist() == [0, 1, 10, 11, 2, 3, 12, 13]


def _hf_state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {"proj_out.weight": torch.randn(2, 2, generator=g)}
    for i in range(2):
        sd[f"layers.{i}.norm1.weight"] = torch.randn(4, generator=g)
        sd[f"layers.{i}.attn.to_q.weight"] = torch.randn(4, 3, generator=g)
        sd[f"layers.{i}.attn.to_k.weight"] = torch.randn(4, 3, generator=g)
    return sd


def test_renames_and_fused_tensors_round_trip():
    hf_sd = _hf_state_dict()
    ours = TOY.from_hf(hf_sd, num_heads=2)
    assert sorted(ours) == ["blocks.0.norm.weight", "blocks.0.qk.weight", "blocks.1.norm.weight", "blocks.1.qk.weight",
                            "head.weight"]
    assert torch.equal(ours["blocks.1.qk.weight"],
                       interleave([hf_sd["layers.1.attn.to_q.weight"], hf_sd["layers.1.attn.to_k.weight"]], 2))
    assert torch.equal(ours["blocks.0.norm.weight"], hf_sd["layers.0.norm1.weight"])
    back = TOY.to_hf(ours, num_heads=2)
    assert back.keys() == hf_sd.keys() and all(torch.equal(back[k], v) for k, v in hf_sd.items())


def test_unknown_and_missing_tensors_are_named():
    ours = TOY.from_hf(_hf_state_dict(), num_heads=2)
    for key in ("blocks.0.extra", "other"):
        with pytest.raises(KeyError, match=re.escape(f"unexpected tensor '{key}' in a Toy checkpoint")):
            TOY.to_hf({**ours, key: torch.zeros(1)}, num_heads=2)
    hf_sd = _hf_state_dict()
    del hf_sd["layers.1.attn.to_k.weight"]
    missing = "missing tensor(s) ['layers.1.attn.to_k.weight'] in the diffusers Toy"
    with pytest.raises(KeyError, match=re.escape(missing)):
        TOY.from_hf(hf_sd, num_heads=2)
    with pytest.raises(KeyError, match=re.escape("unexpected tensor 'layers.0.surprise' in the diffusers Toy")):
        TOY.from_hf({**_hf_state_dict(), "layers.0.surprise": torch.zeros(1)}, num_heads=2)
