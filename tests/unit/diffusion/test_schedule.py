"""The student/critic phase schedule: warm-up, update frequency, counters and rollout lengths."""

import pytest
import torch

from megatron_rcm.diffusion import PhaseSchedule, RCMConfig


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
