"""Wan2.1 DiT against diffusers' WanTransformer3DModel: forward, grads, parameter counts, bad input (loading and the
key maps: tests/unit/models/test_loading.py, tests/unit/checkpoint/test_wan.py)."""

import pytest
import torch
from wan_reference import diffusers_wan, inputs, megatron_state_dict, relative_error

from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models.wan import PRESETS, WanModel


@pytest.fixture(scope="module")
def pair():
    ref = diffusers_wan()
    ours = WanModel(PRESETS["wan-tiny"])
    load_full_state_dict(ours, megatron_state_dict(ref))
    return ref, ours


@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 1, 4, 4), (3, 5, 10, 6), (2, 2, 4, 12)])
def test_forward_matches_diffusers(pair, shape):
    ref, ours = pair
    b, f, h, w = shape
    x, t, text = inputs(b, f, h, w)
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, text)
    assert got.shape == expected.shape == x.shape
    assert relative_error(got, expected) <= 1e-5


def test_backward_matches_diffusers(pair):
    ref, ours = pair
    x, t, text = inputs(2, 3, 6, 8)
    w = torch.randn_like(x)
    ref.zero_grad(), ours.zero_grad()
    (ref(x, t, text, return_dict=False)[0] * w).sum().backward()
    (ours(x, t, text) * w).sum().backward()
    ref_grads = megatron_state_dict_of_grads(ref)
    for name, p in ours.named_parameters():
        assert relative_error(p.grad, ref_grads[name]) <= 1e-4, name


def megatron_state_dict_of_grads(model):
    from megatron_rcm.checkpoint import wan as wan_keys

    return wan_keys.hf_to_mcore({n: p.grad for n, p in model.named_parameters()}, model.config.num_attention_heads)


@pytest.mark.parametrize("preset,count", [("wan2.1-t2v-1.3b", 1_418_996_800), ("wan2.1-t2v-14b", 14_288_491_584)])
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = WanModel(PRESETS[preset], params_dtype=torch.bfloat16, perform_initialization=False)
    assert sum(p.numel() for p in model.parameters()) == count


def test_bad_inputs_are_named(pair):
    _, ours = pair
    x, t, text = inputs()
    with pytest.raises(ValueError, match="latents must be"):
        ours(x[:, :3], t, text)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ours(x[..., :5, :], t, text)
    with pytest.raises(ValueError, match="timestep must be"):
        ours(x, t[:1], text)
    with pytest.raises(ValueError, match="text must be"):
        ours(x, t, text[..., :8])
