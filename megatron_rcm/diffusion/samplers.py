"""Samplers: the distilled student's 1-4-step sampler (TrigFlow) and the teacher's multi-step ODE samplers
(rectified flow: Euler and UniPC-bh2 of order <= 2, with flow shift and classifier-free guidance).

State is kept in float64; networks see their own dtype through the `TrigFlowWrapper`.
"""

import math
from typing import Optional, Sequence

import torch

from megatron_rcm.diffusion.reduce import NoiseFn, randn_like
from megatron_rcm.diffusion.time_sampling import shift_rf_time
from megatron_rcm.diffusion.trigflow import TrigFlowWrapper, classifier_free_guidance, trigflow_noise


@torch.no_grad()
def student_sample(
    student: TrigFlowWrapper,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    num_steps: int,
    sigma_max: float = 80.0,
    mid_times: Sequence[float] = (1.3, 1.0, 0.6),
    generator: Optional[torch.Generator] = None,
    noise_fn: Optional[NoiseFn] = None,
) -> torch.Tensor:
    """N-step consistency sampling: times [arctan(sigma_max), mid_times[:N-1]..., 0]; each step predicts x0 and
    re-noises it with fresh noise to the next time. `noise` is the initial latent (used as x at t_0, as the
    reference does). Returns float64 samples."""
    if not 1 <= num_steps <= len(mid_times) + 1:
        raise ValueError(f"num_steps must be in 1..{len(mid_times) + 1}")
    times = [math.atan(sigma_max), *mid_times[: num_steps - 1], 0.0]
    x = noise.double()
    batch = x.shape[0]
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t = torch.full((batch,), t_cur, dtype=torch.float64, device=x.device)
        x = student(x, t, text).x0
        if t_next > 0:
            fresh = noise_fn(x) if noise_fn is not None else randn_like(x, generator)
            x = trigflow_noise(x, fresh, torch.full_like(t, t_next))
    return x


def flow_sigmas(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rectified-flow times s_0 = 1 > ... > s_N = 0: a uniform grid with the flow shift (Wan: 5 at 480p, 3 at 720p...)."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=device)
    return shift_rf_time(s, shift)


def rf_velocity(
    teacher: TrigFlowWrapper,
    x_s: torch.Tensor,
    s: float | torch.Tensor,
    text: Optional[torch.Tensor],
    neg_text: Optional[torch.Tensor] = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Guided velocity v_u + w (v_c - v_u) of the wrapped network at rectified-flow state x_s, time s (float64)."""
    batch = x_s.shape[0]
    s = torch.as_tensor(s, dtype=torch.float64, device=x_s.device).expand(batch)
    timestep = (teacher.timestep_scale * s).to(teacher.timestep_dtype)
    x_in = x_s.to(teacher.dtype)
    v = teacher.net(x_in, timestep, text).double()
    if neg_text is not None:
        if text is not None and neg_text.shape[0] != batch:
            neg_text = neg_text.expand(batch, *neg_text.shape[1:])
        v = classifier_free_guidance(v, teacher.net(x_in, timestep, neg_text).double(), guidance)
    return v


@torch.no_grad()
def euler_sample(
    teacher: TrigFlowWrapper,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    num_steps: int,
    shift: float = 1.0,
    guidance: float = 1.0,
    neg_text: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Euler on dx/ds = v from s = 1 (x = noise) to s = 0."""
    sig = flow_sigmas(num_steps, shift, noise.device)
    x = noise.double()
    for i in range(num_steps):
        v = rf_velocity(teacher, x, sig[i], text, neg_text, guidance)
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def _lam(s: torch.Tensor) -> torch.Tensor:
    """Half log-SNR log(alpha / sigma) of rectified flow (alpha = 1 - s, sigma = s)."""
    return torch.log(1 - s) - torch.log(s)


@torch.no_grad()
def unipc_sample(
    teacher: TrigFlowWrapper,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    num_steps: int,
    shift: float = 1.0,
    guidance: float = 1.0,
    neg_text: Optional[torch.Tensor] = None,
    order: int = 2,
    use_corrector: bool = True,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, B(h) = e^h - 1 variant "bh2", data prediction) for rectified flow.

    Predictor UniP-p and corrector UniC-p with p <= `order` (1 or 2): warm-up with lower orders, the last step is
    first order (it lands on the data prediction). The corrector reuses the model output at the predicted point,
    so it costs no extra evaluation. Written from the paper's update rules; the step conventions (lower order at the
    start and at the final step, s_0 = 1 - 1e-6) follow diffusers' UniPCMultistepScheduler with flow sigmas, which the
    tests use as the reference.
    """
    if order not in (1, 2):
        raise ValueError("order must be 1 or 2")
    sig = flow_sigmas(num_steps, shift, noise.device)
    # as diffusers does: start just below s = 1 so that the first log-SNR is finite and step 2 can be second order
    sig[0] = min(sig[0].item(), 1.0 - 1e-6)
    lam = _lam(sig)
    x = noise.double()
    ms: list[torch.Tensor] = []  # data predictions at the visited points
    x_prev, order_prev = None, 1
    for i in range(num_steps):
        s = sig[i]
        m = x - s * rf_velocity(teacher, x, s, text, neg_text, guidance)
        if use_corrector and i > 0:
            x = _unipc_update(x_prev, ms, lam, sig, i - 1, i, order_prev, m_next=m)
        ms.append(m)
        this_order = min(order, num_steps - i, len(ms))
        x_prev, order_prev = x, this_order
        x = _unipc_update(x, ms, lam, sig, i, i + 1, this_order)
    return x


def _unipc_update(x, ms, lam, sig, i0, i1, order, m_next=None):
    """One UniPC update from point i0 (state x, data prediction ms[i0]) to i1.

    m_next None: predictor (uses ms[i0 - 1] for order 2). m_next given: corrector with the model output at i1.
    """
    m0 = ms[i0]
    s0, s1 = sig[i0], sig[i1]
    a0, a1 = 1 - s0, 1 - s1
    # sigma_1/sigma_0 x - alpha_1 (e^{-h} - 1) m0 with alpha_1 e^{-h} = alpha_0 sigma_1 / sigma_0: finite at s0 = 1
    # and at s1 = 0 (where it is m0).
    a1_Bh = a0 * s1 / s0 - a1  # alpha_1 * B(h) with B(h) = expm1(-h) (bh2, data prediction)
    x1 = (s1 / s0) * x + (a1 - a0 * s1 / s0) * m0
    if order == 1:
        if m_next is None:
            return x1
        return x1 - a1_Bh * 0.5 * (m_next - m0)
    h = lam[i1] - lam[i0]
    rk = (lam[i0 - 1] - lam[i0]) / h
    D1 = (ms[i0 - 1] - m0) / rk
    if m_next is None:
        return x1 - a1_Bh * 0.5 * D1
    hh = -h
    h_phi_1 = torch.expm1(hh)
    B_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    b0 = h_phi_k / B_h
    h_phi_k = h_phi_k / hh - 0.5
    b1 = h_phi_k * 2 / B_h
    R = torch.stack([torch.stack([torch.ones_like(rk), torch.ones_like(rk)]), torch.stack([rk, torch.ones_like(rk)])])
    rhos = torch.linalg.solve(R, torch.stack([b0, b1]))
    return x1 - a1_Bh * (rhos[0] * D1 + rhos[1] * (m_next - m0))


def teacher_sample(
    teacher: TrigFlowWrapper,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    num_steps: int,
    solver: str = "unipc",
    shift: float = 1.0,
    guidance: float = 1.0,
    neg_text: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The teacher's multi-step sampler: `solver` in {'euler', 'unipc'}."""
    if solver == "euler":
        return euler_sample(teacher, noise, text, num_steps, shift, guidance, neg_text)
    if solver == "unipc":
        return unipc_sample(teacher, noise, text, num_steps, shift, guidance, neg_text)
    raise ValueError(f"unknown solver {solver!r}")

