"""Cosmos-Predict2 DiT against diffusers' CosmosTransformer3DModel: forward, grads, counts, configs, bad input, the
converter's round trip (loading and the key maps: tests/unit/models/test_loading.py,
tests/unit/checkpoint/test_cosmos.py)."""

import os
import subprocess
import sys

import pytest
import torch
from cosmos_reference import (
    diffusers_cosmos,
    inputs,
    megatron_grads,
    megatron_state_dict,
    reference,
    relative_error,
)

from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models.cosmos import PRESETS, CosmosConfig, CosmosModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _pair(preset):
    ref = diffusers_cosmos(preset)
    ours = CosmosModel(PRESETS[preset])
    load_full_state_dict(ours, megatron_state_dict(ref))
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return _pair("cosmos-tiny")


@pytest.mark.parametrize("shape", [(2, 1, 6, 8), (3, 1, 4, 4), (2, 3, 6, 8), (1, 5, 4, 6)])
def test_forward_matches_diffusers(pair, shape):
    """Images (T=1) and videos, batch > 1."""
    ref, ours = pair
    x, t, text = inputs(*shape)
    with torch.no_grad():
        expected = reference(ref, x, t, text)
        got = ours(x, t, text)
    assert got.shape == expected.shape == x.shape
    assert relative_error(got, expected) <= 1e-5


def test_video_fps_padding_mask_and_per_frame_timestep_match_diffusers(pair):
    ref, ours = pair
    x, t, text = inputs(1, 4, 6, 8)
    g = torch.Generator().manual_seed(4)
    pad = (torch.rand(1, 1, 6, 8, generator=g) > 0.5).float()
    per_frame = torch.rand(1, 4, generator=g)
    with torch.no_grad():
        for kw in (dict(fps=16), dict(padding_mask=pad), dict(fps=30, padding_mask=pad)):
            expected = reference(ref, x, t, text, **kw)
            assert relative_error(ours(x, t, text, **kw), expected) <= 1e-5, kw
            assert relative_error(expected, reference(ref, x, t, text)) > 1e-3, kw  # the option matters
        expected = reference(ref, x, per_frame, text, fps=16)
        assert relative_error(ours(x, per_frame, text, fps=16), expected) <= 1e-5


@pytest.mark.parametrize("preset", ["cosmos-tiny-learnable", "cosmos-tiny-v2w"])
def test_learnable_position_and_video2world_match_diffusers(preset):
    ref, ours = _pair(preset)
    x, t, text = inputs(2, 3, 6, 8)
    kw = {}
    if preset.endswith("v2w"):
        # Video2World: a condition-mask channel and per-frame timesteps (conditioning frame at s ~ 1e-4)
        mask = torch.zeros(2, 1, 3, 6, 8)
        mask[:, :, :1] = 1
        kw = dict(condition_mask=mask, fps=16)
        t = torch.stack([torch.full((2,), 1e-4 / (1 + 1e-4)), t, t], dim=1)
    with torch.no_grad():
        expected = reference(ref, x, t, text, **kw)
        got = ours(x, t, text, **kw)
    assert relative_error(got, expected) <= 1e-5


def test_backward_matches_diffusers(pair):
    ref, ours = pair
    x, t, text = inputs(2, 3, 6, 8)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ref.zero_grad(), ours.zero_grad()
    (reference(ref, x, t, text) * w).sum().backward()
    (ours(x, t, text) * w).sum().backward()
    ref_grads = megatron_grads(ref)
    for name, p in ours.named_parameters():
        assert relative_error(p.grad, ref_grads[name]) <= 1e-4, name


@pytest.mark.parametrize("preset,count", [
    ("cosmos-predict2-2b-t2i", 1_956_405_248), ("cosmos-predict2-14b-t2i", 14_265_265_152),
    ("cosmos-predict2-2b-v2w", 1_956_413_440), ("cosmos-predict2-14b-v2w", 14_265_285_632)])
def test_preset_parameter_counts(preset, count):
    """T2I counts are diffusers' published ones; V2W counts were measured on diffusers' model (meta device)."""
    with torch.device("meta"):
        model = CosmosModel(PRESETS[preset], params_dtype=torch.bfloat16, perform_initialization=False)
    assert sum(p.numel() for p in model.parameters()) == count


def test_preset_configs_are_diffusers_configs():
    """A config survives the trip through diffusers' config.json fields."""
    for name, cfg in PRESETS.items():
        assert CosmosConfig.from_diffusers(cfg.to_diffusers()) == cfg, name
    with pytest.raises(ValueError, match="Cosmos 2.5"):
        CosmosConfig.from_diffusers({**PRESETS["cosmos-tiny"].to_diffusers(), "use_crossattn_projection": True})


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
    with pytest.raises(ValueError, match="exceeds the model's max_size"):
        ours(torch.zeros(1, 4, 9, 2, 2), t[:1], text[:1])  # 9 frames > max_size 8 (tables cover 8)


def test_convert_tool_round_trip_is_bit_exact(tmp_path, pair):
    ref, _ = pair
    ref.save_pretrained(tmp_path / "hf")
    tool = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py")]
    for cmd, src, dst in (("hf-to-mcore", "hf", "mcore"), ("mcore-to-hf", "mcore", "hf2")):
        r = subprocess.run([*tool, cmd, "--model", "cosmos", "--input", str(tmp_path / src), "--output",
                            str(tmp_path / dst)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    back = type(ref).from_pretrained(tmp_path / "hf2")
    a, b = ref.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
