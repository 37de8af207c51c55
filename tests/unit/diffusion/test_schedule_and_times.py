"""Time distributions p_G / p_D and the student/critic schedule."""

import math

import pytest
import torch

from megatron_rcm.diffusion import PhaseSchedule, RCMConfig, p_mean_for_latent_frames, sample_p_D, sample_p_G


def test_p_G_is_log_normal_in_sigma():
    assert abs(p_mean_for_latent_frames(20) - (-0.8 + 0.5 * math.log(20))) < 1e-15
    assert abs(p_mean_for_latent_frames(20) - 0.698) < 1e-3  # Wan 1.3B's P_mean = 0.7
    t = sample_p_G(200000, 0.7, 1.6, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and (t > 0).all() and (t < math.pi / 2).all()
    log_sigma = torch.log(torch.tan(t))
    assert abs(log_sigma.mean().item() - 0.7) < 0.02 and abs(log_sigma.std().item() - 1.6) < 0.02


def test_p_D_is_shifted_uniform_in_rf_time():
    shift = 5.0
    t = sample_p_D(200000, shift, torch.Generator().manual_seed(1))
    s = torch.sin(t) / (torch.cos(t) + torch.sin(t))
    u = s / (shift - (shift - 1) * s)  # inverse of the shift
    q = torch.quantile(u.float(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))
    torch.testing.assert_close(q, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]), rtol=0, atol=5e-3)
    assert abs((s < 5 * 0.5 / 3).double().mean().item() - 0.5) < 5e-3  # median of s = shift(0.5) = 5/6


def test_draws_follow_the_generator():
    a = sample_p_D(8, 5.0, torch.Generator().manual_seed(3))
    b = sample_p_D(8, 5.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _brute_force_counts(schedule, it):
    students = sum(schedule.is_student_step(j) for j in range(it))
    return students, it - students


@pytest.mark.parametrize("warmup, freq", [(10, 5), (7, 3), (0, 4), (12, 1)])
def test_schedule_phases_and_counters(warmup, freq):
    sch = PhaseSchedule(RCMConfig(tangent_warmup=warmup, student_update_freq=freq))
    for it in range(warmup):
        assert sch.is_student_step(it) and not sch.dmd_active(it)
        assert sch.tangent_warmup_ratio(it) == it / warmup
    for it in range(warmup, warmup + 4 * freq):
        assert sch.is_student_step(it) == (it % freq == 0)
        assert sch.dmd_active(it) and sch.tangent_warmup_ratio(it) == 1.0
        assert sch.phase(it) == ("student" if it % freq == 0 else "critic")
    for it in range(0, warmup + 5 * freq):
        assert (sch.student_iteration(it), sch.critic_iteration(it)) == _brute_force_counts(sch, it)


def test_pure_scm_never_trains_a_critic_and_rollout_lengths():
    sch = PhaseSchedule(RCMConfig(dmd_weight=0.0, tangent_warmup=3))
    assert all(sch.is_student_step(i) and not sch.dmd_active(i) for i in range(50))
    rcm = PhaseSchedule(RCMConfig(tangent_warmup=0, student_update_freq=2))
    student_ns = [rcm.rollout_steps(i) for i in range(0, 16, 2)]
    critic_ns = [rcm.rollout_steps(i) for i in range(1, 16, 2)]
    assert student_ns == [1, 2, 3, 4, 1, 2, 3, 4] and critic_ns == [1, 2, 3, 4, 1, 2, 3, 4]
    uni = PhaseSchedule(RCMConfig(rollout_steps_sampling="uniform"))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([uni.rollout_steps(0, g) for _ in range(4000)]), minlength=5)
    assert counts[0] == 0 and (counts[1:] > 900).all()


def test_config_validation():
    with pytest.raises(ValueError):
        RCMConfig(scm_weight=0.0, dmd_weight=0.0)
    with pytest.raises(ValueError):
        RCMConfig(rollout_steps_sampling="random")
    assert RCMConfig(dmd_weight=0.0).uses_dmd is False


def test_dmd_gradient_scale_is_one_at_the_reference_size_and_follows_sqrt_numel():
    c = RCMConfig()
    assert c.dmd_weight_mode == "per_sample" and c.dmd_reference_numel == 16 * 21 * 60 * 104
    assert c.dmd_gradient_scale(c.dmd_reference_numel) == 1.0
    assert c.dmd_gradient_scale(c.dmd_reference_numel // 4) == pytest.approx(2.0)
    assert RCMConfig(dmd_weight_mode="paper").dmd_gradient_scale(2) == 1.0
    with pytest.raises(ValueError, match="dmd_weight_mode"):
        RCMConfig(dmd_weight_mode="per_element")
