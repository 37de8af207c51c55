"""3D rotary position embedding over (frame, height, width) token grids, with tangents for free: RoPE is
linear in its input, so the primal and the tangent are rotated together."""

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan/Cosmos split of a head's channels between the frame, height and width axes."""
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def _grid_angles(parts: list[torch.Tensor], grid: tuple[int, int, int]) -> torch.Tensor:
    """Per-axis angles [size, dim/2] (frame, height, width) -> [F*H*W, head_dim/2], tokens in row-major (f, h, w)."""
    f, h, w = grid
    af = parts[0][:, None, None, :].expand(f, h, w, -1)
    ah = parts[1][None, :, None, :].expand(f, h, w, -1)
    aw = parts[2][None, None, :, :].expand(f, h, w, -1)
    return torch.cat([af, ah, aw], dim=-1).reshape(f * h * w, -1)


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                axis_scale: tuple[float, float, float] = (1.0, 1.0, 1.0), device=None) -> torch.Tensor:
    """Angles [F*H*W, head_dim/2] in float64 for tokens in row-major (f, h, w) order.

    Each axis uses its own slice of the channel pairs with frequencies theta^(-2i/d_axis), `d_axis` the
    axis's channel count; `axis_scale` divides the frequencies (NTK-style per-axis scaling).
    """
    parts = []
    for size, dim, scale in zip(grid, axis_dims(head_dim), axis_scale):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)) / scale
        parts.append(torch.outer(torch.arange(size, dtype=torch.float64, device=device), freqs))
    return _grid_angles(parts, grid)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [S, B, H, D] by angles with cos/sin [S, 1, 1, D/2]; computed in
    the dtype of cos/sin (float32, or float64 for float64 models), returned in x's dtype."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    xe, xo = pairs[..., 0], pairs[..., 1]
    out = torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def rope_angles_ntk(grid, head_dim: int, rope_scale, fps: float | None = None, base_fps: float = 24.0,
                    theta: float = 10000.0, device=None) -> torch.Tensor:
    """Angles [F*H*W, head_dim/2] in float64, tokens in row-major (f, h, w) order, channels (frame, height, width).

    Each axis's base is NTK-scaled: theta * scale^(d/(d-2)); with `fps` the frame positions are f * base_fps / fps.
    """
    parts = []
    for axis, (size, dim, scale) in enumerate(zip(grid, axis_dims(head_dim), rope_scale)):
        base = theta * scale ** (dim / (dim - 2))
        freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device)[: dim // 2] / dim)
        pos = torch.arange(size, dtype=torch.float64, device=device)
        if axis == 0 and fps is not None:
            pos = pos / fps * base_fps
        parts.append(torch.outer(pos, freqs))
    return _grid_angles(parts, grid)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x[:D/2], x[D/2:]) of x [S, B, H, D] by cos/sin [S, 1, 1, D/2]; computed in cos's dtype."""
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
