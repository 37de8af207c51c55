"""Time distributions p_G (log-normal in sigma) and p_D (shifted uniform in RF time)."""

import math

import torch

from megatron_rcm.diffusion import p_mean_for_latent_frames, sample_p_D, sample_p_G


def test_p_G_is_log_normal_in_sigma():
    assert abs(p_mean_for_latent_frames(20) - (-0.8 + 0.5 * math.log(20))) < 1e-15
    assert abs(p_mean_for_latent_frames(20) - 0.698) < 1e-3  # Wan 1.3B's P_mean = 0.7
    t = sample_p_G(200000, 0.7, 1.6, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and (t > 0).all() and (t < math.pi / 2).all()
    log_sigma = torch.log(torch.tan(t))
    assert abs(log_sigma.mean().item() - 0.7) < 0.02 and abs(log_sigma.std().item() - 1.6) < 0.02


def test_p_D_is_shifted_uniform_in_rf_time():
    shift = 5.0
    t = sample_p_D(200000, shift, torch.Generator().manual_seed(1))
    s = torch.sin(t) / (torch.cos(t) + torch.sin(t))
    u = s / (shift - (shift - 1) * s)  # inverse of the shift
    q = torch.quantile(u.float(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))
    torch.testing.assert_close(q, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]), rtol=0, atol=5e-3)
    assert abs((s < 5 * 0.5 / 3).double().mean().item() - 0.5) < 5e-3  # median of s = shift(0.5) = 5/6


def test_draws_follow_the_generator():
    a = sample_p_D(8, 5.0, torch.Generator().manual_seed(3))
    b = sample_p_D(8, 5.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
