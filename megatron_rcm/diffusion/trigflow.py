"""TrigFlow <-> rectified-flow maps and the wrapper that turns a velocity network into a TrigFlow model.

TrigFlow (sigma_data = 1): x_t = cos t x0 + sin t eps, t in [0, pi/2], F = E[cos t eps - sin t x0 | x_t].
Rectified flow (Wan, Cosmos-Predict2): x_s = (1 - s) x0 + s eps, the network predicts v = eps - x0 at
`timestep_scale * s`. Equal signal-to-noise ratio gives tan t = s / (1 - s), x_s = x_t / (cos t + sin t).
All maps run in float64: the sCM target is a small difference of large terms near t = pi/2.
"""

from typing import NamedTuple, Optional, Protocol

import torch

from megatron_rcm.diffusion.reduce import expand_as_sample


class VelocityNetwork(Protocol):
    """What the objective needs from a network: `net(latents, timestep, text) -> v` and its forward-mode JVP."""

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: Optional[torch.Tensor]) -> torch.Tensor: ...

    def jvp(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: Optional[torch.Tensor],
        latents_tangent: torch.Tensor,
        timestep_tangent: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------------------------
# Time and state maps (float64)
# ---------------------------------------------------------------------------------------------------------------


def rf_time_from_trigflow(t: torch.Tensor) -> torch.Tensor:
    """s = sin t / (cos t + sin t)."""
    t = t.double()
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def trigflow_time_from_rf(s: torch.Tensor) -> torch.Tensor:
    """t = arctan(s / (1 - s)), written with atan2 so that s = 1 maps to pi/2."""
    s = s.double()
    return torch.atan2(s, 1 - s)


def rf_state_from_trigflow(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_s = x_t / (cos t + sin t)."""
    t = expand_as_sample(t.double(), x_t)
    return x_t.double() / (torch.cos(t) + torch.sin(t))


def trigflow_state_from_rf(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_t = x_s / sqrt((1 - s)^2 + s^2), the inverse of `rf_state_from_trigflow` at t(s)."""
    s = expand_as_sample(s.double(), x_s)
    return x_s.double() / torch.sqrt((1 - s) ** 2 + s**2)


def trigflow_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F = (cos t x_t - x0_hat) / sin t with x0_hat = x_s - s v, rewritten as (cos t - sin t) x_s + v / (cos t + sin t)
    so that it has no division by sin t (finite at t = 0)."""
    t = expand_as_sample(t.double(), x_t)
    c, sn = torch.cos(t), torch.sin(t)
    return (c - sn) * x_t.double() / (c + sn) + v.double() / (c + sn)


def velocity_from_trigflow(F: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Inverse of `trigflow_from_velocity`: v = (cos t + sin t) F - (cos t - sin t) x_t."""
    t = expand_as_sample(t.double(), x_t)
    c, sn = torch.cos(t), torch.sin(t)
    return (c + sn) * F.double() - (c - sn) * x_t.double()


def x0_from_trigflow(F: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The consistency parametrisation f = cos t x_t - sin t F (the clean-data prediction)."""
    t = expand_as_sample(t.double(), x_t)
    return torch.cos(t) * x_t.double() - torch.sin(t) * F.double()


def trigflow_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos t x0 + sin t eps (float64)."""
    t = expand_as_sample(t.double(), x0)
    return torch.cos(t) * x0.double() + torch.sin(t) * eps.double()


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance in the standard form uncond + w (cond - uncond).

    (The rCM reference once shipped cond + w (cond - uncond), i.e. w + 1 in this form.)"""
    return uncond + guidance * (cond - uncond)


# ---------------------------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------------------------


class TrigFlowPrediction(NamedTuple):
    """Outputs of a TrigFlow model in float64: the TrigFlow velocity F and the clean-data prediction x0."""

    F: torch.Tensor
    x0: torch.Tensor


def _param_dtype(net) -> torch.dtype:
    params = getattr(net, "parameters", None)
    if params is not None:
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


class TrigFlowWrapper:
    """A TrigFlow model `F(x_t, t, text)` on top of a rectified-flow velocity network.

    The network runs in its own dtype (bf16 at scale) and is called at `timestep_scale * s`; the wrapper casts
    inputs to that dtype and does every map in float64. `teacher`, `student` and `critic` are all wrapped the same way.

    Args:
        net: a `VelocityNetwork`.
        timestep_scale: the network's timestep units (`RCMConfig.timestep_scale`; Wan: 1000, Cosmos-Predict2: 1).
        dtype: dtype the latents are cast to for the network (default: the dtype of its first floating parameter).
        timestep_dtype: dtype of the timestep (default float32; float64 for float64 networks) - the time embedding
            is computed in fp32 because high-precision time matters at 10B+ scale.
    """

    def __init__(
        self,
        net: VelocityNetwork,
        timestep_scale: float,
        dtype: Optional[torch.dtype] = None,
        timestep_dtype: Optional[torch.dtype] = None,
    ):
        self.net = net
        self.timestep_scale = float(timestep_scale)
        self.dtype = dtype if dtype is not None else _param_dtype(net)
        if timestep_dtype is None:
            timestep_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.timestep_dtype = timestep_dtype

    def _maps(self, x_t: torch.Tensor, t: torch.Tensor):
        t = t.double()
        tb = expand_as_sample(t, x_t)
        c, sn = torch.cos(tb), torch.sin(tb)
        c_in = 1.0 / (c + sn)
        x_s = x_t.double() * c_in
        timestep = self.timestep_scale * rf_time_from_trigflow(t)
        return c, sn, c_in, x_s, timestep

    def _prediction(self, v, c, sn, c_in, x_s) -> TrigFlowPrediction:
        v = v.double()
        F = (c - sn) * x_s + c_in * v
        x0 = x_s - (sn * c_in) * v
        return TrigFlowPrediction(F, x0)

    def network_inputs(self, x_t: torch.Tensor, t: torch.Tensor):
        """What the network is called with at (x_t, t) — latents in its dtype and the timestep — and the maps
        `prediction` needs; for a caller that runs the network itself (a pipeline schedule)."""
        c, sn, c_in, x_s, timestep = self._maps(x_t, t)
        return x_s.to(self.dtype), timestep.to(self.timestep_dtype), (c, sn, c_in, x_s)

    def prediction(self, v: torch.Tensor, maps) -> TrigFlowPrediction:
        """F and x0 from the network's velocity `v` at the inputs `network_inputs` gave `maps` for."""
        return self._prediction(v, *maps)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, text: Optional[torch.Tensor] = None) -> TrigFlowPrediction:
        """F and x0 at (x_t, t); differentiable w.r.t. the network's parameters when grad is enabled."""
        latents, timestep, maps = self.network_inputs(x_t, t)
        return self.prediction(self.net(latents, timestep, text), maps)

    @torch.no_grad()
    def jvp(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: Optional[torch.Tensor],
        x_tangent: torch.Tensor,
        t_tangent: torch.Tensor,
    ) -> tuple[TrigFlowPrediction, torch.Tensor]:
        """Prediction at (x_t, t) and the directional derivative dF = dF/dx_t . x_tangent + dF/dt . t_tangent.

        The tangent is chained through the float64 maps into `net.jvp`: d x_s = c_in x_tangent + c_in' t_tangent x_t,
        d timestep = timestep_scale * ds/dt * t_tangent with ds/dt = c_in^2.
        """
        c, sn, c_in, x_s, timestep = self._maps(x_t, t)
        t_tangent_b = expand_as_sample(t_tangent.double(), x_t)
        dc_in = (sn - c) * c_in**2  # d/dt 1/(cos t + sin t)
        x_s_tangent = c_in * x_tangent.double() + dc_in * t_tangent_b * x_t.double()
        timestep_tangent = self.timestep_scale * (c_in**2).flatten() * t_tangent.double()
        v, v_tangent = self.net.jvp(
            x_s.to(self.dtype),
            timestep.to(self.timestep_dtype),
            text,
            x_s_tangent.to(self.dtype),
            timestep_tangent.to(self.timestep_dtype),
        )
        v, v_tangent = v.double(), v_tangent.double()
        pred = self._prediction(v, c, sn, c_in, x_s)
        dF = -(sn + c) * t_tangent_b * x_s + (c - sn) * x_s_tangent + dc_in * t_tangent_b * v + c_in * v_tangent
        return pred, dF

    def guided(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: Optional[torch.Tensor],
        neg_text: Optional[torch.Tensor],
        guidance: float,
        batched: bool = True,
    ) -> TrigFlowPrediction:
        """Classifier-free guided prediction against the negative-prompt embedding `neg_text`.

        F and x0 are affine in v with the same coefficients, so guiding v, F or x0 is the same thing. Without a
        negative prompt (`neg_text is None`) this is the conditional prediction. `batched` runs the conditional and
        unconditional halves as one call of twice the batch.
        """
        if neg_text is None:
            return self(x_t, t, text)
        if text is not None and neg_text.shape[0] != text.shape[0]:
            neg_text = neg_text.expand(text.shape[0], *neg_text.shape[1:])
        if batched and text is not None and neg_text.shape[1:] == text.shape[1:]:
            both = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text, neg_text]))
            cond = TrigFlowPrediction(*(p[: x_t.shape[0]] for p in both))
            uncond = TrigFlowPrediction(*(p[x_t.shape[0] :] for p in both))
        else:
            cond, uncond = self(x_t, t, text), self(x_t, t, neg_text)
        return TrigFlowPrediction(
            classifier_free_guidance(cond.F, uncond.F, guidance), classifier_free_guidance(cond.x0, uncond.x0, guidance)
        )
