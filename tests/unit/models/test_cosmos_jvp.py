"""model.jvp against torch.func.jvp over diffusers' Cosmos model in float64."""

import pytest
import torch
from cosmos_reference import (
    _learnable_pos_forward,
    _rope_forward,
    diffusers_cosmos,
    float64_cosmos,
    inputs,
    megatron_state_dict,
    reference,
    reference_jvp,
    relative_error,
)

from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models.cosmos import PRESETS, CosmosModel


def _pair(preset):
    ref = diffusers_cosmos(preset, dtype=torch.float64)
    ours = CosmosModel(PRESETS[preset], params_dtype=torch.float64)
    load_full_state_dict(ours, megatron_state_dict(ref))
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return _pair("cosmos-tiny")


def _tangents(x, t, which, seed=3):
    g = torch.Generator().manual_seed(seed)
    tx = torch.randn(x.shape, generator=g, dtype=x.dtype) if which in ("latents", "both") else torch.zeros_like(x)
    # timesteps are in [0, 1]: a tangent of order 1
    tt = torch.randn(t.shape, generator=g, dtype=t.dtype) if which in ("timestep", "both") else torch.zeros_like(t)
    return tx, tt


@pytest.mark.parametrize("which", ["latents", "timestep", "both"])
def test_jvp_matches_torch_func_jvp_over_diffusers(pair, which):
    ref, ours = pair
    x, t, text = inputs(2, 3, 6, 8, dtype=torch.float64)
    tx, tt = _tangents(x, t, which)
    with float64_cosmos():
        expected, expected_tangent = reference_jvp(ref, x, t, text, tx, tt, fps=16)
    out, tangent = ours.jvp(x, t, text, tx, tt, fps=16)
    assert relative_error(out, expected) <= 1e-6
    assert relative_error(tangent, expected_tangent) <= 1e-6
    assert expected_tangent.abs().max() > 1e-3  # a real tangent, not zeros


def test_jvp_image_and_video2world_per_frame_timesteps():
    """T=1 images on the text-to-image model; per-frame timesteps with a condition mask on the Video2World one."""
    ref, ours = _pair("cosmos-tiny")
    x, t, text = inputs(2, 1, 6, 8, dtype=torch.float64)
    tx, tt = _tangents(x, t, "both")
    with float64_cosmos():
        expected, expected_tangent = reference_jvp(ref, x, t, text, tx, tt)
    out, tangent = ours.jvp(x, t, text, tx, tt)
    assert relative_error(out, expected) <= 1e-6 and relative_error(tangent, expected_tangent) <= 1e-6

    ref, ours = _pair("cosmos-tiny-v2w")
    x, t, text = inputs(2, 3, 4, 6, dtype=torch.float64)
    mask = torch.zeros(2, 1, 3, 4, 6, dtype=torch.float64)
    mask[:, :, :1] = 1
    t = torch.stack([torch.full((2,), 1e-4, dtype=torch.float64), t, t], dim=1)
    tx, tt = _tangents(x, t, "both")
    tt[:, 0] = 0  # the conditioning frame's time is fixed
    with float64_cosmos():
        expected, expected_tangent = reference_jvp(ref, x, t, text, tx, tt, condition_mask=mask, fps=16)
    out, tangent = ours.jvp(x, t, text, tx, tt, condition_mask=mask, fps=16)
    assert relative_error(out, expected) <= 1e-6 and relative_error(tangent, expected_tangent) <= 1e-6


def test_reference_agrees_with_central_difference(pair):
    """The neutralised float64 reference is exact: a central finite difference agrees to ~1e-8."""
    ref, _ = pair
    x, t, text = inputs(1, 2, 4, 4, dtype=torch.float64)
    tx, tt = _tangents(x, t, "both")
    h = 1e-5
    with float64_cosmos(), torch.no_grad():
        _, tangent = reference_jvp(ref, x, t, text, tx, tt)
        plus = reference(ref, x + h * tx, t + h * tt, text)
        minus = reference(ref, x - h * tx, t - h * tt, text)
    assert relative_error((plus - minus) / (2 * h), tangent) <= 1e-7


def test_float64_replacements_are_diffusers_formulas(pair):
    """The float64 RoPE and learnable-position replacements used by the reference are diffusers' formulas (checked
    in float32)."""
    ref, _ = pair
    x = torch.zeros(1, 4, 3, 6, 8)
    for fps in (None, 16):
        cos, sin = ref.rope(x, fps=fps)
        cos64, sin64 = _rope_forward(ref.rope, x, fps=fps, dtype=torch.float32)
        assert torch.allclose(cos, cos64, atol=1e-6) and torch.allclose(sin, sin64, atol=1e-6)
    learnable = diffusers_cosmos("cosmos-tiny-learnable").learnable_pos_embed
    assert torch.allclose(learnable(x), _learnable_pos_forward(learnable, x, dtype=torch.float32), atol=1e-6)


def test_jvp_runs_without_autograd(pair):
    _, ours = pair
    x, t, text = inputs(1, 1, 4, 4, dtype=torch.float64)
    out, tangent = ours.jvp(x.requires_grad_(), t, text, torch.ones_like(x), None)
    assert not out.requires_grad and not tangent.requires_grad
