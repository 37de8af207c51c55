"""Power-function EMA (EDM2, Karras et al. 2024): theta_ema(T) averages theta(tau) with weight ~ tau^gamma.

Discretely, after the k-th update `ema <- beta_k ema + (1 - beta_k) theta_k` with beta_k = (1 - 1/k)^(gamma + 1),
so theta_ema(T) = sum_k [(k/T)^(gamma+1) - ((k-1)/T)^(gamma+1)] theta_k (no bias at start, no warm-up needed).
The width is set by sigma_rel, the standard deviation of the averaging profile relative to T:
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
"""

from typing import Iterable

import numpy as np
import torch


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the profile with relative width sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0."""
    s2 = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_ema_beta(num_updates: int, gamma: float) -> float:
    """beta of the `num_updates`-th update (1-based): (1 - 1/k)^(gamma + 1); 0 for the first, which copies."""
    return (1.0 - 1.0 / num_updates) ** (gamma + 1)


class PowerEMA:
    """fp32 power-function EMA of a module's parameters (the student's; the EMA is what gets exported).

    Works on whatever tensors the module holds (local shards under TP/DP sharding). Call `update(student)` after
    each student optimizer step; `copy_to(module)` writes the average into a module of the same structure.
    """

    def __init__(self, module: torch.nn.Module, sigma_rel: float = 0.05):
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(sigma_rel)
        self.num_updates = 0
        self.shadow = {n: p.detach().to(torch.float32).clone() for n, p in module.named_parameters()}

    def _params(self, module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        params = dict(module.named_parameters())
        if params.keys() != self.shadow.keys():
            raise ValueError("module parameters do not match the EMA's")
        return params.items()

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> float:
        """Fold the module's current parameters in; returns the beta used."""
        self.num_updates += 1
        beta = power_ema_beta(self.num_updates, self.gamma)
        for name, p in self._params(module):
            self.shadow[name].lerp_(p.detach().to(torch.float32), 1.0 - beta)
        return beta

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, p in self._params(module):
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"sigma_rel": self.sigma_rel, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.sigma_rel = float(state["sigma_rel"])
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
