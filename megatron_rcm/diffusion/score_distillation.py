"""The score-distillation regularizer of rCM (DMD-style reverse-divergence gradient) and its critic.

Student step (after the tangent warm-up), as separate calls for the training loop:
  1. `student_rollout(...)`                      no grad: N - 1 student steps from pure noise -> (x_t, t)
  2. `student(x_t, t, text).x0`                  with grad (can share one forward with the sCM input)
  3. `dmd_gradient(teacher, critic, x0.detach())` no grad: critic and guided teacher at a re-noised sample
  4. `dmd_loss(x0, grad)` (or `dmd_surrogate_loss` when the with-grad pass is a pipeline schedule)
Critic step: `critic_inputs(...)` (no grad), `critic(inputs.x_t, inputs.t, text).x0` with grad, `critic_loss(...)`.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_rcm.diffusion.config import RCMConfig
from megatron_rcm.diffusion.reduce import (
    NoiseFn,
    SumFn,
    expand_as_sample,
    per_sample_nonfinite,
    per_sample_numel,
    per_sample_sum,
    randn_like,
)
from megatron_rcm.diffusion.time_sampling import sample_p_D
from megatron_rcm.diffusion.trigflow import TrigFlowWrapper, trigflow_noise


def _noise(like: torch.Tensor, generator, noise_fn: Optional[NoiseFn]) -> torch.Tensor:
    return noise_fn(like) if noise_fn is not None else randn_like(like, generator)


@torch.no_grad()
def student_rollout(
    student: TrigFlowWrapper,
    like: torch.Tensor,
    text: Optional[torch.Tensor],
    num_steps: int,
    config: RCMConfig,
    generator: Optional[torch.Generator] = None,
    noise_fn: Optional[NoiseFn] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first `num_steps - 1` steps of an N-step student sample from pure noise at t = pi/2 (no grad).

    Each step predicts x0, draws t_hat ~ p_D, moves to t_n = min(t_hat, t_{n-1}) and re-noises with fresh noise.
    Returns (x_t, t) at which the caller evaluates the last step (with grad on student steps).
    `like` gives the latent shape/device (this rank's shard under CP).
    """
    if num_steps < 1:
        raise ValueError("num_steps >= 1")
    batch = like.shape[0]
    t = torch.full((batch,), math.pi / 2, dtype=torch.float64, device=like.device)
    x = _noise(like, generator, noise_fn)
    for _ in range(num_steps - 1):
        x0 = student(x, t, text).x0
        t = torch.minimum(sample_p_D(batch, config.dmd_time_shift, generator, like.device), t)
        x = trigflow_noise(x0, _noise(like, generator, noise_fn), t)
    return x, t


@dataclass
class DMDGradient:
    """No-grad part of the regularizer (float64)."""

    grad: torch.Tensor
    """(x0_critic - x0_teacher) / mean|x0_student - x0_teacher|, times `RCMConfig.dmd_gradient_scale`; zero on masked
    samples."""
    t: torch.Tensor
    x_t: torch.Tensor
    x0_teacher: torch.Tensor
    x0_critic: torch.Tensor
    valid: torch.Tensor


@torch.no_grad()
def dmd_gradient(
    teacher: TrigFlowWrapper,
    critic: TrigFlowWrapper,
    x0_student: torch.Tensor,
    text: Optional[torch.Tensor],
    neg_text: Optional[torch.Tensor],
    config: RCMConfig,
    generator: Optional[torch.Generator] = None,
    t: Optional[torch.Tensor] = None,
    noise_fn: Optional[NoiseFn] = None,
    sum_fn: Optional[SumFn] = None,
    numel: Optional[float] = None,
) -> DMDGradient:
    """Re-noise the student's sample at t_D ~ p_D and compare the critic's (fake) and the guided teacher's (real)
    x0 predictions. The per-sample normaliser mean|x0_student - x0_teacher| (clipped at `dmd_norm_clip`) is global
    across CP shards through `sum_fn`. Everything in float64.

    `numel`: a sample's real element count over all shards; by default the shards' sizes summed through `sum_fn`,
    which counts padding - pass the real count when the shards are padded (sharded tokens, zeros on padding)."""
    x0_student = x0_student.detach().double()
    if t is None:
        t = sample_p_D(x0_student.shape[0], config.dmd_time_shift, generator, x0_student.device)
    x_t = trigflow_noise(x0_student, _noise(x0_student, generator, noise_fn), t)
    x0_critic = critic(x_t, t, text).x0
    x0_teacher = teacher.guided(x_t, t, text, neg_text, config.guidance).x0
    if numel is None:
        numel = per_sample_numel(x0_student, sum_fn)
    scale = per_sample_sum((x0_student - x0_teacher).abs(), sum_fn) / numel
    scale = scale.clamp(min=config.dmd_norm_clip) / config.dmd_gradient_scale(numel)
    grad = (x0_critic - x0_teacher) / expand_as_sample(scale, x0_student)
    valid = ~per_sample_nonfinite(grad, sum_fn)
    grad = torch.where(expand_as_sample(valid, grad), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return DMDGradient(grad=grad, t=t, x_t=x_t, x0_teacher=x0_teacher, x0_critic=x0_critic, valid=valid)


def _masked(x0_student: torch.Tensor, grad: DMDGradient, sum_fn: Optional[SumFn]) -> torch.Tensor:
    valid = grad.valid & ~per_sample_nonfinite(x0_student.detach(), sum_fn)
    zero = torch.zeros((), dtype=torch.float64, device=x0_student.device)
    return torch.where(expand_as_sample(valid, x0_student), x0_student.double(), zero)


def dmd_loss(x0_student: torch.Tensor, grad: DMDGradient, sum_fn: Optional[SumFn] = None) -> torch.Tensor:
    """Per-sample `[B]` sum (x0 - sg(x0 - grad))^2 over local elements; its gradient w.r.t. x0 is 2 * grad."""
    x0 = _masked(x0_student, grad, sum_fn)
    return ((x0 - (x0 - grad.grad).detach()) ** 2).flatten(1).sum(dim=1)


def dmd_surrogate_loss(x0_student: torch.Tensor, grad: DMDGradient, sum_fn: Optional[SumFn] = None) -> torch.Tensor:
    """Per-sample `[B]` 2 <x0, sg(grad)>: the same parameter gradient as `dmd_loss` (its value differs), for a
    with-grad pass (e.g. a pipeline schedule) that cannot see the other networks' outputs."""
    x0 = _masked(x0_student, grad, sum_fn)
    return 2.0 * (x0 * grad.grad.detach()).flatten(1).sum(dim=1)


@dataclass
class CriticInputs:
    """No-grad part of a critic step (float64): a student sample and its re-noised version."""

    x0_student: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor


@torch.no_grad()
def critic_inputs(
    student: TrigFlowWrapper,
    like: torch.Tensor,
    text: Optional[torch.Tensor],
    num_steps: int,
    config: RCMConfig,
    generator: Optional[torch.Generator] = None,
    noise_fn: Optional[NoiseFn] = None,
) -> CriticInputs:
    """Sample the student with an N-step rollout (no grad) and re-noise it at t_D ~ p_D."""
    x, t = student_rollout(student, like, text, num_steps, config, generator, noise_fn)
    x0_student = student(x, t, text).x0
    t_d = sample_p_D(like.shape[0], config.dmd_time_shift, generator, like.device)
    x_t = trigflow_noise(x0_student, _noise(like, generator, noise_fn), t_d)
    return CriticInputs(x0_student=x0_student, x_t=x_t, t=t_d)


def critic_loss(critic_x0: torch.Tensor, inputs: CriticInputs, sum_fn: Optional[SumFn] = None) -> torch.Tensor:
    """Per-sample `[B]` flow-matching (denoising) loss of the critic on student samples:
    sum (x0_student - x0_critic)^2 / sin^2 t over local elements (the 1/sin^2 t weight makes it the velocity loss)."""
    valid = ~per_sample_nonfinite(inputs.x0_student, sum_fn) & ~per_sample_nonfinite(critic_x0.detach(), sum_fn)
    mask = expand_as_sample(valid, critic_x0)
    zero = torch.zeros((), dtype=torch.float64, device=critic_x0.device)
    diff = torch.where(mask, inputs.x0_student - critic_x0.double(), zero)
    w = expand_as_sample(torch.sin(inputs.t) ** -2, diff)
    return (w * diff**2).flatten(1).sum(dim=1)
