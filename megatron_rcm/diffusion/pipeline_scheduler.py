"""`RCMScheduler`: the rCM student's 1-4-step sampler as a diffusers scheduler, for `WanPipeline` and its kin.

diffusers' Wan pipelines hold the rectified-flow state x_s = (1 - s) x0 + s eps, call the transformer at
`timestep = num_train_timesteps * s` for each entry of `scheduler.timesteps` and hand its velocity v to
`scheduler.step`. The rCM sampler (`megatron_rcm.diffusion.samplers.student_sample`) visits the TrigFlow times
[arctan(sigma_max), mid_times[:N-1]..., 0]; at equal signal-to-noise ratio these are the flow times
s = sin t / (cos t + sin t) (for sigma_max 80 and mid times (1.3, 1.0, 0.6): 987.7, 782.7, 609.0, 406.2 on the
0-1000 scale). Each step predicts x0 = x_s - s v and re-noises it with fresh noise to the next time,
x_s' = (1 - s') x0 + s' eps', which is the TrigFlow re-noising cos t' x0 + sin t' eps' expressed in the flow state.

The stock `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)` takes the same step, but its
`set_timesteps(num_inference_steps)` spaces times on a (shifted) linear grid and cannot give these times, nor the
rCM rule that fewer steps use a prefix of the same times; pipelines call `set_timesteps(num_inference_steps)`
themselves, so the times have to come from the scheduler's config. Hence this class.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from megatron_rcm.diffusion.reduce import randn_like


@dataclass
class RCMSchedulerOutput(BaseOutput):
    """`prev_sample`: the state at the next time; `pred_original_sample`: this step's x0 prediction."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def rcm_flow_times(num_steps: int, sigma_max: float, mid_times: Sequence[float]) -> list[float]:
    """The rectified-flow times s_0 > ... > s_N = 0 of the N-step rCM sampler (float64 arithmetic)."""
    if not 1 <= num_steps <= len(mid_times) + 1:
        raise ValueError(f"num_inference_steps must be in 1..{len(mid_times) + 1} for this rCM student "
                         f"(mid_times {list(mid_times)}), got {num_steps}")
    times = [math.atan(sigma_max), *mid_times[: num_steps - 1]]
    return [math.sin(t) / (math.cos(t) + math.sin(t)) for t in times] + [0.0]


class RCMScheduler(SchedulerMixin, ConfigMixin):
    """The rCM student sampler: N in 1..len(mid_times)+1 steps at fixed TrigFlow times, x0 prediction and
    re-noising with fresh noise (float64 state arithmetic, as `student_sample`).

    Fresh noise is drawn like `student_sample` draws it: float64 standard normal from the generator given to
    `step`, else from `scheduler.generator` (set it to a `torch.Generator` before calling a pipeline, which does
    not pass one to `step`), else from torch's default RNG. The pipeline's initial latents are the flow state at
    s_0; `init_noise_sigma` = sqrt(s_0^2 + (1 - s_0)^2) is their standard deviation, and latents
    `noise * init_noise_sigma` start where `student_sample` started from `noise`.

    Args:
        num_train_timesteps: the network's timestep units (Wan: 1000): timestep = num_train_timesteps * s.
        sigma_max: the initial noise level, t_0 = arctan(sigma_max).
        mid_times: the TrigFlow times after the first; an N-step sample uses the first N - 1.
    """

    config_name = "scheduler_config.json"
    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, sigma_max: float = 80.0,
                 mid_times: Sequence[float] = (1.3, 1.0, 0.6)):
        if sigma_max <= 0:
            raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
        if any(not 0 < t < math.pi / 2 for t in mid_times) or list(mid_times) != sorted(mid_times, reverse=True):
            raise ValueError(f"mid_times must be decreasing TrigFlow times in (0, pi/2), got {list(mid_times)}")
        self.generator: Optional[torch.Generator] = None
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self.set_timesteps(len(mid_times) + 1)

    @property
    def init_noise_sigma(self) -> float:
        s0 = float(self.sigmas64[0])
        return math.sqrt(s0 * s0 + (1 - s0) ** 2)

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **kwargs) -> None:
        """Times of the `num_inference_steps`-step rCM sampler: `sigmas` (flow times, ending at 0) and
        `timesteps` = num_train_timesteps * sigmas[:-1] (float32, what the transformer is called with)."""
        if kwargs.get("sigmas") is not None or kwargs.get("timesteps") is not None:
            raise ValueError("RCMScheduler takes its times from its config (sigma_max, mid_times), not as arguments")
        config = self.config
        self.sigmas64 = torch.tensor(rcm_flow_times(num_inference_steps, config.sigma_max, config.mid_times),
                                     dtype=torch.float64, device=device)
        self.sigmas = self.sigmas64.float()
        self.timesteps = (config.num_train_timesteps * self.sigmas64[:-1]).float()
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep) -> int:
        matches = (self.timesteps == torch.as_tensor(timestep, dtype=self.timesteps.dtype,
                                                     device=self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of this scheduler's {self.timesteps.tolist()}")
        return int(matches[0])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """One rCM step from the current time to the next: x0 = x_s - s v, then x_s' = (1 - s') x0 + s' eps'."""
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(
                timestep)
        if self._step_index >= len(self.timesteps):
            raise IndexError(f"step called {self._step_index + 1} times for a {len(self.timesteps)}-step schedule")
        s, s_next = self.sigmas64[self._step_index].item(), self.sigmas64[self._step_index + 1].item()
        x0 = sample.double() - s * model_output.double()
        prev = x0
        if s_next > 0:
            fresh = randn_like(x0, generator if generator is not None else self.generator)
            prev = (1 - s_next) * x0 + s_next * fresh
        self._step_index += 1
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return RCMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
