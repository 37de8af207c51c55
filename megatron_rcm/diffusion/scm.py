"""sCM: the continuous-time consistency target from the student's JVP along the teacher's PF-ODE (arXiv 2410.11081,
with the rCM tangent warm-up and normalisation).

Split for the training loop: `scm_targets` (no grad: teacher CFG, student JVP, target) then one with-grad student
forward at `targets.x_t, targets.t`, then `scm_loss(student_F, targets)`.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_rcm.diffusion.config import RCMConfig
from megatron_rcm.diffusion.reduce import (
    NoiseFn,
    SumFn,
    expand_as_sample,
    per_sample_nonfinite,
    per_sample_sum,
    randn_like,
)
from megatron_rcm.diffusion.time_sampling import sample_p_G
from megatron_rcm.diffusion.trigflow import TrigFlowWrapper, trigflow_noise


@dataclass
class SCMTargets:
    """No-grad results of an sCM step (float64). The with-grad student forward runs at (`x_t`, `t`)."""

    x_t: torch.Tensor
    t: torch.Tensor
    F_teacher: torch.Tensor
    """Teacher's guided TrigFlow velocity (the PF-ODE direction)."""
    F_minus: torch.Tensor
    """Student's F at (x_t, t) from the JVP pass (the stop-gradient copy)."""
    dF: torch.Tensor
    """Tangent cos t sin t dF_student/dt along the teacher's ODE."""
    g: torch.Tensor
    """Normalised target; zero on masked samples."""
    valid: torch.Tensor
    """Bool `[B]`: samples whose target is finite."""


def scm_tangents(x_t: torch.Tensor, t: torch.Tensor, F_teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """JVP tangents (cos t sin t F_teacher, cos t sin t): dx_t/dt along the PF-ODE, pre-multiplied by cos t sin t
    (sCM's "JVP rearrangement", which keeps the tangent bounded near t = pi/2)."""
    t = t.double()
    w = torch.cos(t) * torch.sin(t)
    return expand_as_sample(w, x_t) * F_teacher.double(), w


def scm_target(
    F_minus: torch.Tensor,
    dF: torch.Tensor,
    F_teacher: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    warmup_ratio: float,
    norm_eps: float = 0.1,
    sum_fn: Optional[SumFn] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = -cos t sqrt(1 - r^2 sin^2 t) (F_minus - F_teacher) - r (cos t sin t x_t + dF), normalised per sample
    g / (||g||_2 + norm_eps) in float64; samples with a non-finite g are zeroed. Returns (g, valid `[B]`).

    At r = 1, g = cos t * d/dt f(x_t, t) along the teacher's ODE for f = cos t x_t - sin t F, so g = 0 exactly
    when the student is the teacher's consistency function.
    """
    tb = expand_as_sample(t.double(), x_t)
    c, sn = torch.cos(tb), torch.sin(tb)
    r = float(warmup_ratio)
    g = -c * torch.sqrt(1 - r**2 * sn**2) * (F_minus.double() - F_teacher.double()) - r * (c * sn * x_t.double() + dF.double())
    valid = ~per_sample_nonfinite(g, sum_fn)
    g = torch.where(expand_as_sample(valid, g), g, torch.zeros((), dtype=g.dtype, device=g.device))
    norm = per_sample_sum(g * g, sum_fn).sqrt()
    return g / expand_as_sample(norm + norm_eps, g), valid


@torch.no_grad()
def scm_targets(
    student: TrigFlowWrapper,
    teacher: TrigFlowWrapper,
    x0: torch.Tensor,
    text: Optional[torch.Tensor],
    neg_text: Optional[torch.Tensor],
    config: RCMConfig,
    warmup_ratio: float,
    generator: Optional[torch.Generator] = None,
    t: Optional[torch.Tensor] = None,
    noise_fn: Optional[NoiseFn] = None,
    sum_fn: Optional[SumFn] = None,
) -> SCMTargets:
    """Draw t ~ p_G and eps, run the guided teacher and the student's JVP (no grad), and build the target.

    Args:
        x0: clean latents `[B, ...]` (this rank's shard under context parallelism).
        text / neg_text: conditioning and negative-prompt embeddings (None for unconditional models).
        warmup_ratio: r = min(1, it / tangent_warmup) (see `PhaseSchedule.tangent_warmup_ratio`).
        generator: draws t and (by default) eps; make it identical across a CP group.
        t: optional times `[B]` overriding the draw.
        noise_fn: noise source; the default draws noise of x0's (local) shape from `generator`, which is right only
            for unsharded latents - under CP pass `sharded_noise_fn(...)` (full noise, this rank's chunk).
        sum_fn: makes per-sample sums global across CP shards.
    """
    if t is None:
        t = sample_p_G(x0.shape[0], config.p_mean, config.p_std, generator, device=x0.device)
    eps = noise_fn(x0) if noise_fn is not None else randn_like(x0, generator)
    x_t = trigflow_noise(x0, eps, t)
    F_teacher = teacher.guided(x_t, t, text, neg_text, config.guidance).F
    x_tangent, t_tangent = scm_tangents(x_t, t, F_teacher)
    pred, dF = student.jvp(x_t, t, text, x_tangent, t_tangent)
    g, valid = scm_target(pred.F, dF, F_teacher, x_t, t, warmup_ratio, config.g_norm_eps, sum_fn)
    return SCMTargets(x_t=x_t, t=t, F_teacher=F_teacher, F_minus=pred.F, dF=dF, g=g, valid=valid)


def scm_loss(student_F: torch.Tensor, targets: SCMTargets, sum_fn: Optional[SumFn] = None) -> torch.Tensor:
    """Per-sample sCM loss `[B]`: sum (F_student - F_minus - g)^2 over this rank's elements.

    Under context parallelism the local sums are what each rank backpropagates (their gradients add up in the
    gradient all-reduce); `sum_fn` here only synchronises the NaN mask of the with-grad prediction.
    """
    valid = targets.valid & ~per_sample_nonfinite(student_F.detach(), sum_fn)
    mask = expand_as_sample(valid, student_F)
    zero = torch.zeros((), dtype=torch.float64, device=student_F.device)
    # torch.where (not multiplication) so that a NaN in a masked sample cannot reach the gradient
    F = torch.where(mask, student_F.double(), zero)
    F_minus = torch.where(mask, targets.F_minus, zero)
    g = torch.where(mask, targets.g, zero)
    return ((F - F_minus - g) ** 2).flatten(1).sum(dim=1)
