"""Power-function EMA against EDM2's closed forms."""

import numpy as np
import pytest
import torch

from megatron_rcm.diffusion import PowerEMA, gamma_to_sigma_rel, power_ema_beta, sigma_rel_to_gamma


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])
def test_sigma_rel_to_gamma_matches_edm2_values(sigma_rel, gamma):
    # EDM2 (Karras et al. 2024) quotes gamma = 16.97 for sigma_rel = 0.05 and 6.94 for 0.10
    assert abs(sigma_rel_to_gamma(sigma_rel) - gamma) < 0.01
    assert abs(gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) - sigma_rel) < 1e-12


def test_sigma_rel_is_the_relative_std_of_the_power_profile():
    gamma = sigma_rel_to_gamma(0.05)
    tau = np.linspace(0.0, 1.0, 200001)
    w = tau**gamma
    w /= np.trapezoid(w, tau)
    mean = np.trapezoid(w * tau, tau)
    std = np.sqrt(np.trapezoid(w * (tau - mean) ** 2, tau))
    assert abs(std - 0.05) < 1e-6


def test_updates_equal_the_closed_form_weighted_average():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = PowerEMA(model, sigma_rel=0.1)
    history = []
    for _ in range(37):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        history.append([p.detach().double().clone() for p in model.parameters()])
        ema.update(model)
    T, g = len(history), ema.gamma
    k = np.arange(1, T + 1, dtype=np.float64)
    weights = (k / T) ** (g + 1) - ((k - 1) / T) ** (g + 1)  # integral of the tau^gamma profile over each step
    assert abs(weights.sum() - 1) < 1e-12
    for j, (name, _) in enumerate(model.named_parameters()):
        expected = sum(w * h[j] for w, h in zip(weights, history))
        torch.testing.assert_close(ema.shadow[name].double(), expected, rtol=0, atol=1e-5)
        assert ema.shadow[name].dtype == torch.float32


def test_first_update_copies_and_state_round_trips():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    ema = PowerEMA(model, sigma_rel=0.05)
    assert power_ema_beta(1, ema.gamma) == 0.0
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], p.float())
    state = ema.state_dict()
    other = PowerEMA(torch.nn.Linear(2, 2).to(torch.bfloat16), sigma_rel=0.2)
    other.load_state_dict(state)
    assert other.num_updates == 1 and other.gamma == ema.gamma
    target = torch.nn.Linear(2, 2).to(torch.bfloat16)
    other.copy_to(target)
    for (_, a), (_, b) in zip(target.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a, b)
