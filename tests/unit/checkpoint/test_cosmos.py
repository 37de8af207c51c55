"""checkpoint/cosmos.py: the original Cosmos-Predict2 release <-> diffusers names, against diffusers' own single-file
converter, and on to ours."""

import os
import sys

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

from megatron_rcm.checkpoint import cosmos as cosmos_keys
from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models.cosmos import PRESETS, CosmosModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
from cosmos_reference import diffusers_cosmos, megatron_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    ref = diffusers_cosmos("cosmos-tiny")
    ours = CosmosModel(PRESETS["cosmos-tiny"])
    load_full_state_dict(ours, megatron_state_dict(ref))
    return ref, ours


def test_original_release_names_agree_with_diffusers_converter(pair):
    """Our original <-> diffusers maps against diffusers' own single-file converter for Cosmos 2.0 checkpoints."""
    ref, ours = pair
    hf_sd = ref.state_dict()
    original = cosmos_keys.hf_to_original(hf_sd)
    assert "net.blocks.0.self_attn.q_proj.weight" in original and "net.x_embedder.proj.1.weight" in original
    # non-weight entries of the original release, dropped on import
    original.update({"net.pos_embedder.seq": torch.arange(4.0), "net.pos_embedder.dim_spatial_range": torch.zeros(2),
                     "net.pos_embedder.dim_temporal_range": torch.zeros(2), "net.accum_iteration": torch.tensor(3),
                     "net.blocks.0.self_attn._extra_state": torch.zeros(1)})
    theirs = convert_cosmos_transformer_checkpoint_to_diffusers(dict(original))
    mine = cosmos_keys.original_to_hf(original)
    assert set(theirs) == set(mine) == set(hf_sd)
    assert all(torch.equal(mine[k], hf_sd[k]) and torch.equal(theirs[k], hf_sd[k]) for k in hf_sd)
    ours_sd = cosmos_keys.hf_to_mcore(mine, ref.config.num_attention_heads)
    for name, p in ours.named_parameters():
        assert torch.equal(p, ours_sd[name]), name
    with pytest.raises(KeyError, match="surprise"):
        cosmos_keys.original_to_hf({"net.blocks.0.surprise.weight": torch.zeros(1)})
