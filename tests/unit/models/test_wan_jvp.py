"""model.jvp against torch.func.jvp over diffusers' Wan model in float64."""

import pytest
import torch
from wan_float64_reference import float64_diffusers, reference_jvp
from wan_reference import diffusers_wan, inputs, megatron_state_dict, relative_error

from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models.wan import PRESETS, WanModel


@pytest.fixture(scope="module")
def pair():
    with float64_diffusers():
        ref = diffusers_wan(dtype=torch.float64)
        # rebuild RoPE tables inside the patch so they are not float32-rounded
        ref.rope.__init__(ref.config.attention_head_dim, ref.config.patch_size, ref.config.rope_max_seq_len)
    ours = WanModel(PRESETS["wan-tiny"], params_dtype=torch.float64)
    load_full_state_dict(ours, megatron_state_dict(ref))
    return ref, ours


def _tangents(x, t, which, seed=3):
    g = torch.Generator().manual_seed(seed)
    tx = torch.randn(x.shape, generator=g, dtype=x.dtype) if which in ("latents", "both") else torch.zeros_like(x)
    tt = torch.randn(t.shape, generator=g, dtype=t.dtype) * 100 if which in ("timestep", "both") else torch.zeros_like(t)
    return tx, tt


@pytest.mark.parametrize("which", ["latents", "timestep", "both"])
def test_jvp_matches_torch_func_jvp_over_diffusers(pair, which):
    ref, ours = pair
    x, t, text = inputs(2, 3, 6, 8, dtype=torch.float64)
    tx, tt = _tangents(x, t, which)
    with float64_diffusers():
        expected, expected_tangent = reference_jvp(ref, x, t, text, tx, tt)
    out, tangent = ours.jvp(x, t, text, tx, tt)
    assert relative_error(out, expected) <= 1e-6
    assert relative_error(tangent, expected_tangent) <= 1e-6
    assert expected_tangent.abs().max() > 1e-3  # a real tangent, not zeros


def test_reference_agrees_with_central_difference(pair):
    """The neutralised float64 reference is exact: a central finite difference agrees to ~1e-8."""
    ref, _ = pair
    x, t, text = inputs(1, 2, 4, 4, dtype=torch.float64)
    tx, tt = _tangents(x, t, "both")
    h = 1e-5
    with float64_diffusers(), torch.no_grad():
        _, tangent = reference_jvp(ref, x, t, text, tx, tt)
        plus = ref(x + h * tx, t + h * tt, text, return_dict=False)[0]
        minus = ref(x - h * tx, t - h * tt, text, return_dict=False)[0]
    assert relative_error((plus - minus) / (2 * h), tangent) <= 1e-7


def test_jvp_runs_without_autograd(pair):
    _, ours = pair
    x, t, text = inputs(1, 1, 4, 4, dtype=torch.float64)
    out, tangent = ours.jvp(x.requires_grad_(), t, text, torch.ones_like(x), None)
    assert not out.requires_grad and not tangent.requires_grad
