"""Velocity networks with known answers for the objective's tests (they implement the network protocol:
`net(latents, timestep, text) -> v` and `net.jvp(...)` via torch.func.jvp)."""

import torch
from torch import nn

SCALE = 1000.0


class _VelocityNet(nn.Module):
    def jvp(self, latents, timestep, text, latents_tangent, timestep_tangent):
        with torch.no_grad():
            return torch.func.jvp(lambda x, ts: self(x, ts, text), (latents, timestep), (latents_tangent, timestep_tangent))


def _b(s, x):
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class GaussianTeacher(_VelocityNet):
    """Exact rectified-flow velocity E[eps - x0 | x_s] for data N(mu, std^2 I)."""

    def __init__(self, mu: torch.Tensor, std: float):
        super().__init__()
        self.register_buffer("mu", mu.double())
        self.std = float(std)
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # carries the dtype

    def forward(self, latents, timestep, text=None):
        s = _b(timestep.double() / SCALE, latents)
        a = 1 - s
        var = a**2 * self.std**2 + s**2
        r = latents - a * self.mu
        x0 = self.mu + a * self.std**2 / var * r
        eps = s / var * r
        return (eps - x0).to(latents.dtype)


def consistency_x0(x_s, s, mu, std):
    """The exact consistency function (endpoint of the PF-ODE) for data N(mu, std^2 I): the standardised
    coordinate (x_s - (1-s) mu) / sqrt((1-s)^2 std^2 + s^2) is constant along the ODE."""
    a = 1 - s
    return mu + std * (x_s - a * mu) / torch.sqrt(a**2 * std**2 + s**2)


class GaussianConsistencyStudent(_VelocityNet):
    """A velocity network whose x0 prediction is the exact consistency function of N(mu, std^2 I):
    v = (x_s - f(x_s, s)) / s. With `mu` different from the data's, it is a perturbed student."""

    def __init__(self, mu: torch.Tensor, std: float, learnable: bool = False):
        super().__init__()
        mu = mu.double().clone()
        if learnable:
            self.mu = nn.Parameter(mu)
        else:
            self.register_buffer("mu", mu)
            self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.std = float(std)

    def forward(self, latents, timestep, text=None):
        s = _b(timestep.double() / SCALE, latents)
        return (latents - consistency_x0(latents, s, self.mu, self.std)) / s


class MLPVelocity(_VelocityNet):
    """A small conditional MLP velocity network (text: [B, L, D], mean-pooled)."""

    def __init__(self, dim: int = 3, text_dim: int = 4, hidden: int = 32, dtype=torch.float64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.text_dim = text_dim
        self.l1 = nn.Linear(dim + 2 + text_dim, hidden, dtype=dtype)
        self.l2 = nn.Linear(hidden, dim, dtype=dtype)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, latents, timestep, text=None):
        b = latents.shape[0]
        x = latents.reshape(b, -1)
        s = (timestep / SCALE).to(x.dtype).reshape(b, 1)
        cond = torch.zeros(b, self.text_dim, dtype=x.dtype) if text is None else text.to(x.dtype).mean(dim=1)
        h = torch.tanh(self.l1(torch.cat([x, torch.sin(3 * s), torch.cos(3 * s), cond], dim=1)))
        return self.l2(h).reshape(latents.shape)
