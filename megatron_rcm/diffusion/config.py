"""Hyper-parameters of the rCM objective (defaults: Wan2.1 T2V 1.3B, arXiv 2510.08431 and its reference code)."""

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RCMConfig:
    """One objective for pure sCM, pure DMD and rCM: they differ only in `scm_weight` / `dmd_weight`.

    sCM only: `dmd_weight=0` (no critic, every iteration is a student step).
    DMD only: `scm_weight=0` (and usually `tangent_warmup=0`).
    rCM: both non-zero (paper: lambda = dmd_weight / scm_weight = 0.01).
    """

    # --- loss weights -------------------------------------------------------------------------------
    scm_weight: float = 1.0
    """Weight of the sCM consistency loss. 0 turns sCM off (pure DMD)."""

    dmd_weight: float = 0.01
    """Weight lambda of the score-distillation (DMD) regularizer, relative to `scm_weight` (paper: 0.01). 0 turns the
    regularizer and the critic off (pure sCM). How it is read depends on `dmd_weight_mode`."""

    dmd_weight_mode: Literal["per_sample", "paper"] = "per_sample"
    """'paper': lambda multiplies the DMD loss as in the reference code. Its gradient is normalised per element
    (O(1) per element, L2 norm ~ sqrt(N) for N latent elements per sample) while the sCM target is normalised per
    sample (L2 norm ~ 1), so one lambda pulls ~sqrt(N) times harder at N elements: 0.01 at Wan's 2.1M elements is
    ~1000x stronger than on a 2-D toy. 'per_sample': the DMD gradient is multiplied by
    sqrt(dmd_reference_numel / N), so the same lambda means the same balance of the two terms at every size and
    equals 'paper' at `dmd_reference_numel` elements (Wan 480p)."""

    dmd_reference_numel: int = 16 * 21 * 60 * 104
    """Latent elements per sample at which 'per_sample' equals 'paper': Wan2.1 480p x 81 frames (16 x 21 x 60 x 104,
    the size the paper's lambda = 0.01 was tuned at)."""

    critic_weight: float = 1.0
    """Weight of the critic's (fake score's) flow-matching loss."""

    # --- time distributions -------------------------------------------------------------------------
    p_mean: float = 0.7
    """Mean of log(sigma) for the sCM time distribution p_G (sigma = tan t). Wan 1.3B: -0.8 + 0.5 ln(20 latent frames)
    ~= 0.7; see `p_mean_for_latent_frames`."""

    p_std: float = 1.6
    """Standard deviation of log(sigma) for p_G."""

    dmd_time_shift: float = 5.0
    """Shift of the uniform rectified-flow time of p_D (used for rollout intermediate times and the DMD/critic
    noise level): s = shift u / (1 + (shift - 1) u), u ~ U(0, 1), t = arctan(s / (1 - s))."""

    # --- teacher ------------------------------------------------------------------------------------
    guidance: float = 5.0
    """Classifier-free guidance scale w of the teacher, standard form F_u + w (F_c - F_u). Wan 5.0, Cosmos 4.5."""

    # --- sCM target -----------------------------------------------------------------------------------
    tangent_warmup: int = 1000
    """Iterations over which the tangent warm-up ratio r = min(1, it / tangent_warmup) grows; only sCM runs during it."""

    g_norm_eps: float = 0.1
    """c in the per-sample normalisation g / (||g||_2 + c) of the sCM target."""

    # --- score-distillation regularizer ----------------------------------------------------------------
    student_update_freq: int = 5
    """After warm-up, one student step every `student_update_freq` iterations, critic steps otherwise (14B: 10)."""

    max_rollout_steps: int = 4
    """Student rollouts use N in {1, ..., max_rollout_steps} steps from pure noise."""

    rollout_steps_sampling: Literal["cyclic", "uniform"] = "cyclic"
    """How N is chosen: 'cyclic' (reference code: N = 1 + phase iteration mod max) or 'uniform' (paper: random)."""

    dmd_norm_clip: float = 1e-5
    """Lower clip of the DMD normaliser mean|x0_student - x0_teacher|."""

    # --- student sampler ------------------------------------------------------------------------------
    sigma_max: float = 80.0
    """Initial noise level of the student sampler, t_0 = arctan(sigma_max) (80: diverse ... 1600: sharper)."""

    student_mid_times: tuple[float, ...] = field(default_factory=lambda: (1.3, 1.0, 0.6))
    """Intermediate TrigFlow times of the 1-4-step student sampler (the reference inference script's;
    docs/architecture.md, "The rCM objective"); an N-step sample uses the first N - 1."""

    # --- EMA ------------------------------------------------------------------------------------------
    ema_sigma_rel: float = 0.05
    """Relative standard deviation of the power-function EMA (EDM2); paper 0.05, reference code 0.1."""

    def __post_init__(self):
        if self.scm_weight < 0 or self.dmd_weight < 0 or (self.scm_weight == 0 and self.dmd_weight == 0):
            raise ValueError("need scm_weight >= 0, dmd_weight >= 0 and at least one of them > 0")
        if self.dmd_weight_mode not in ("per_sample", "paper"):
            raise ValueError(f"dmd_weight_mode must be 'per_sample' or 'paper', got {self.dmd_weight_mode!r}")
        if self.dmd_reference_numel < 1:
            raise ValueError("dmd_reference_numel must be >= 1")
        if self.rollout_steps_sampling not in ("cyclic", "uniform"):
            raise ValueError(f"rollout_steps_sampling must be 'cyclic' or 'uniform', got {self.rollout_steps_sampling}")
        if self.max_rollout_steps < 1 or self.student_update_freq < 1 or self.tangent_warmup < 0:
            raise ValueError("max_rollout_steps >= 1, student_update_freq >= 1, tangent_warmup >= 0 required")
        if self.max_rollout_steps > len(self.student_mid_times) + 1:
            raise ValueError("student_mid_times needs max_rollout_steps - 1 entries")
        self.student_mid_times = tuple(float(t) for t in self.student_mid_times)

    def dmd_gradient_scale(self, numel):
        """Factor on the DMD gradient for samples of `numel` latent elements (a number or a `[B]` tensor; 1 in
        'paper' mode)."""
        if self.dmd_weight_mode == "paper":
            return 1.0
        return (self.dmd_reference_numel / numel) ** 0.5

    @property
    def uses_dmd(self) -> bool:
        """Whether the score regularizer and its critic are on."""
        return self.dmd_weight > 0

    @property
    def uses_scm(self) -> bool:
        return self.scm_weight > 0
