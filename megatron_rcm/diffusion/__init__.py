"""The rCM method: TrigFlow maps, time samplers, sCM / DMD / critic losses, samplers, EMA.

Network-agnostic: everything works on `TrigFlowWrapper`s around velocity networks that implement
`net(latents, timestep, text) -> v` and `net.jvp(latents, timestep, text, latents_tangent, timestep_tangent)`.
"""

from megatron_rcm.diffusion.config import RCMConfig
from megatron_rcm.diffusion.ema import PowerEMA, gamma_to_sigma_rel, power_ema_beta, sigma_rel_to_gamma
from megatron_rcm.diffusion.reduce import (
    NoiseFn,
    SumFn,
    per_sample_nonfinite,
    per_sample_numel,
    per_sample_sum,
    process_group_sum,
    sharded_noise_fn,
)
from megatron_rcm.diffusion.samplers import (
    euler_sample,
    flow_sigmas,
    rf_velocity,
    student_sample,
    teacher_sample,
    unipc_sample,
)
from megatron_rcm.diffusion.schedule import PhaseSchedule
from megatron_rcm.diffusion.scm import SCMTargets, scm_loss, scm_tangents, scm_target, scm_targets
from megatron_rcm.diffusion.score_distillation import (
    CriticInputs,
    DMDGradient,
    critic_inputs,
    critic_loss,
    dmd_gradient,
    dmd_loss,
    dmd_surrogate_loss,
    student_rollout,
)
from megatron_rcm.diffusion.time_sampling import p_mean_for_latent_frames, sample_p_D, sample_p_G, shift_rf_time
from megatron_rcm.diffusion.trigflow import (
    TrigFlowPrediction,
    TrigFlowWrapper,
    VelocityNetwork,
    classifier_free_guidance,
    rf_state_from_trigflow,
    rf_time_from_trigflow,
    trigflow_from_velocity,
    trigflow_noise,
    trigflow_state_from_rf,
    trigflow_time_from_rf,
    velocity_from_trigflow,
    x0_from_trigflow,
)

