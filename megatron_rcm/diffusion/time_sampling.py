"""Training-time distributions (float64, explicit generators so that a CP group can draw identical times; a CPU
generator draws the same times on every device)."""

import math
from typing import Optional

import torch

from megatron_rcm.diffusion.reduce import draw


def p_mean_for_latent_frames(num_latent_frames: int, base_p_mean: float = -0.8) -> float:
    """The reference scales sigma by sqrt(T) for T latent frames, i.e. shifts log(sigma) by 0.5 ln T.

    Wan 1.3B: T = 20 gives -0.8 + 0.5 ln 20 = 0.698."""
    return base_p_mean + 0.5 * math.log(num_latent_frames)


def sample_p_G(
    batch_size: int,
    p_mean: float,
    p_std: float,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """sCM times: log sigma ~ N(p_mean, p_std^2), t = arctan(sigma). Returns float64 `[B]` in (0, pi/2) on `device`
    (drawn on the generator's device)."""
    z = draw(torch.randn, (batch_size,), generator, device)
    return torch.atan(torch.exp(p_mean + p_std * z))


def shift_rf_time(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift s -> shift s / (1 + (shift - 1) s) (pushes times towards noise for shift > 1)."""
    return shift * s / (1 + (shift - 1) * s)


def sample_p_D(
    batch_size: int,
    shift: float,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Score-distillation times: u ~ U(0, 1), s = shift(u), t = arctan(s / (1 - s)). Returns float64 `[B]` on `device`
    (drawn on the generator's device)."""
    u = draw(torch.rand, (batch_size,), generator, device)
    s = shift_rf_time(u, shift)
    return torch.atan2(s, 1 - s)
