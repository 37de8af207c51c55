"""models/rope.py: the 3-D RoPE angles against diffusers' Wan and Cosmos tables, and both rotations against complex
multiplication."""

import math

import pytest
import torch
from diffusers.models.transformers.transformer_cosmos import CosmosRotaryPosEmbed
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from megatron_rcm.models.rope import apply_rope_half, apply_rope_interleaved, axis_dims, rope_angles, rope_angles_ntk

F64 = torch.float64


def test_axis_split_is_wan_and_cosmos():
    assert axis_dims(128) == (44, 42, 42)
    assert axis_dims(24) == (8, 8, 8)


@pytest.mark.parametrize("grid", [(1, 4, 6), (3, 2, 5)])
def test_angles_match_diffusers_wan(grid):
    head_dim = 24
    angles = rope_angles(grid, head_dim)
    assert angles.shape == (math.prod(grid), head_dim // 2) and angles.dtype == F64
    cos, sin = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=16)(torch.zeros(1, 4, grid[0], 2 * grid[1],
                                                                                    2 * grid[2]))
    # diffusers repeats each channel pair's angle on both channels of the pair, and hands its tables out in float32
    torch.testing.assert_close(torch.cos(angles).repeat_interleave(2, -1), cos[0, :, 0].double(), rtol=0, atol=1e-7)
    torch.testing.assert_close(torch.sin(angles).repeat_interleave(2, -1), sin[0, :, 0].double(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("fps", [None, 16.0])
def test_ntk_angles_match_diffusers_cosmos(fps):
    head_dim, grid, scale = 24, (3, 4, 2), (2.0, 1.0, 3.0)
    angles = rope_angles_ntk(grid, head_dim, scale, fps=fps)
    rope = CosmosRotaryPosEmbed(head_dim, max_size=(8, 16, 16), patch_size=(1, 2, 2), rope_scale=scale)
    cos, sin = rope(torch.zeros(1, 4, grid[0], 2 * grid[1], 2 * grid[2]), fps=fps)
    # diffusers computes its table in float32 and lays out (frame, height, width) twice, once per half
    for table, ours in ((cos, torch.cos(angles)), (sin, torch.sin(angles))):
        torch.testing.assert_close(table.double(), torch.cat([ours, ours], dim=-1), rtol=0, atol=1e-5)


def _rotation(x, angles, pairs):
    """x [S, B, H, D] rotated by `angles` [S, D/2] as complex numbers: pairs (2i, 2i+1) or halves (i, D/2 + i)."""
    d = x.shape[-1]
    z = torch.view_as_complex(x.unflatten(-1, (d // 2, 2)).contiguous()) if pairs else torch.complex(*x.chunk(2, -1))
    z = z * torch.polar(torch.ones_like(angles), angles)[:, None, None]
    return torch.view_as_real(z).flatten(-2) if pairs else torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("rotate,pairs", [(apply_rope_interleaved, True), (apply_rope_half, False)])
def test_rotations_are_complex_multiplication(rotate, pairs):
    g = torch.Generator().manual_seed(0)
    angles = rope_angles((2, 3, 2), 24)
    x = torch.randn(12, 2, 3, 24, generator=g, dtype=F64)
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    torch.testing.assert_close(rotate(x, cos, sin), _rotation(x, angles, pairs), rtol=0, atol=1e-13)
    # computed in the tables' dtype, returned in x's
    y = rotate(x.float(), cos.float(), sin.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _rotation(x, angles, pairs), rtol=0, atol=1e-5)
