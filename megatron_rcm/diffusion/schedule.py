"""Which network an iteration trains, and the per-phase counters the objective needs."""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_rcm.diffusion.config import RCMConfig


@dataclass
class PhaseSchedule:
    """Student/critic alternation of rCM (reference semantics).

    During the tangent warm-up (`it < tangent_warmup`) every iteration is an sCM-only student step. Afterwards a
    student step runs every `student_update_freq` iterations (`it % freq == 0`) and critic steps otherwise. Without
    the regularizer (`dmd_weight == 0`) every iteration is a student step.
    """

    config: RCMConfig

    def is_student_step(self, it: int) -> bool:
        config = self.config
        return (not config.uses_dmd) or it < config.tangent_warmup or it % config.student_update_freq == 0

    def phase(self, it: int) -> str:
        """'student' or 'critic'."""
        return "student" if self.is_student_step(it) else "critic"

    def dmd_active(self, it: int) -> bool:
        """Whether a student step at `it` adds the score regularizer (off during the tangent warm-up)."""
        return self.config.uses_dmd and it >= self.config.tangent_warmup

    def tangent_warmup_ratio(self, it: int) -> float:
        """r = min(1, it / tangent_warmup) (1 without warm-up)."""
        w = self.config.tangent_warmup
        return 1.0 if w == 0 else min(1.0, it / w)

    def student_iteration(self, it: int) -> int:
        """How many student steps ran before `it` (drives the EMA step count and cyclic rollout lengths)."""
        config = self.config
        if not config.uses_dmd or it <= config.tangent_warmup:
            return it
        f = config.student_update_freq
        # multiples of f in [tangent_warmup, it) = ceil(it / f) - ceil(tangent_warmup / f)
        return config.tangent_warmup + (-(-it // f)) - (-(-config.tangent_warmup // f))

    def critic_iteration(self, it: int) -> int:
        """How many critic steps ran before `it`."""
        return it - self.student_iteration(it)

    def rollout_steps(self, it: int, generator: Optional[torch.Generator] = None) -> int:
        """N in {1, ..., max_rollout_steps} for the rollout at iteration `it` (cyclic over the phase's own
        iterations, or uniform from `generator`, which must be synchronised across a CP group)."""
        config = self.config
        if config.rollout_steps_sampling == "uniform":
            return 1 + int(torch.randint(config.max_rollout_steps, (1,), generator=generator).item())
        k = self.student_iteration(it) if self.is_student_step(it) else self.critic_iteration(it)
        return 1 + k % config.max_rollout_steps
