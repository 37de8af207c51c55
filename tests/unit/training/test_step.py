"""training/step.py in one process (tiny float64 Wan networks, no context parallelism): the student phase is the sCM
targets then one with-grad student forward, its total weighs the sCM and DMD parts, the critic phase trains the critic
alone, and every pass is timed under its name. The same step under context parallelism is
tests/distributed/test_step_context_parallel.py."""

import pytest
import torch

from megatron_rcm import diffusion as D
from megatron_rcm.models.wan import PRESETS, WanModel
from megatron_rcm.parallel import state
from megatron_rcm.training.step import RCMStep

F64 = torch.float64


def _networks():
    state.ensure_parallel()
    nets = {}
    for i, name in enumerate(("teacher", "student", "critic")):
        torch.manual_seed(100 + i)
        net = WanModel(PRESETS["wan-tiny"], params_dtype=F64)
        with torch.no_grad():  # distinct networks, no zero-initialised layer left
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        nets[name] = net.requires_grad_(name != "teacher")
    return nets


def _inputs():
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(2, 4, 1, 4, 4, generator=g, dtype=F64)
    text = torch.randn(2, 5, 16, generator=g, dtype=F64)
    neg = torch.randn(1, 5, 16, generator=g, dtype=F64)
    return x0, text, neg


def test_student_phase_is_the_scm_target_then_one_with_grad_forward():
    nets, (x0, text, neg) = _networks(), _inputs()
    rc = D.RCMConfig(dmd_weight=0.0, tangent_warmup=0)
    schedule = D.PhaseSchedule(rc)
    step = RCMStep(rc, schedule, nets["teacher"], nets["student"], neg_text=neg, timestep_scale=1000.0)
    res = step.run("student", step.micro_batch(x0, text, torch.Generator().manual_seed(5)), 3)

    student, teacher = D.TrigFlowWrapper(nets["student"], 1000.0), D.TrigFlowWrapper(nets["teacher"], 1000.0)
    targets = D.scm_targets(student, teacher, x0, text, neg, rc, schedule.tangent_warmup_ratio(3),
                            torch.Generator().manual_seed(5))
    want = D.scm_loss(student(targets.x_t, targets.t, text).F, targets)
    assert set(res.parts) == {"loss/scm"}
    torch.testing.assert_close(res.parts["loss/scm"], want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.total, rc.scm_weight * want.detach(), rtol=1e-12, atol=0)
    res.loss.sum().backward()
    assert all(p.grad is not None for p in nets["student"].parameters())
    assert all(p.grad is None for p in nets["teacher"].parameters())


def _rcm():
    return D.RCMConfig(tangent_warmup=0, dmd_weight=0.5, critic_weight=2.0, student_update_freq=2, max_rollout_steps=2)


def _iteration(schedule, phase):
    return next(it for it in range(20) if schedule.phase(it) == phase and schedule.dmd_active(it))


def test_rcm_student_total_weighs_its_parts_and_each_pass_is_timed():
    nets, (x0, text, neg) = _networks(), _inputs()
    rc = _rcm()
    schedule = D.PhaseSchedule(rc)
    step = RCMStep(rc, schedule, nets["teacher"], nets["student"], nets["critic"], neg_text=neg,
                   timestep_scale=1000.0)
    it = _iteration(schedule, "student")
    res = step.run("student", step.micro_batch(x0, text, torch.Generator().manual_seed(5)), it)
    assert set(res.parts) == {"loss/scm", "loss/dmd"}
    torch.testing.assert_close(res.total, rc.scm_weight * res.parts["loss/scm"] + rc.dmd_weight * res.parts["loss/dmd"],
                               rtol=1e-14, atol=0)
    times = step.pop_times()
    assert set(times) == {"teacher_cfg", "student_jvp", "rollout", "dmd_gradient", "student_grad"}
    assert all(t > 0 for t in times.values()) and step.pop_times() == {}
    again = step.run("student", step.micro_batch(x0, text, torch.Generator().manual_seed(5)), it)
    assert torch.equal(again.total, res.total)  # every draw comes from the micro-batch's generator


def test_critic_phase_trains_the_critic_alone():
    nets, (x0, text, neg) = _networks(), _inputs()
    rc = _rcm()
    schedule = D.PhaseSchedule(rc)
    step = RCMStep(rc, schedule, nets["teacher"], nets["student"], nets["critic"], neg_text=neg,
                   timestep_scale=1000.0)
    mb = step.micro_batch(x0, text, torch.Generator().manual_seed(6))
    res = step.run("critic", mb, _iteration(schedule, "critic"))
    assert set(res.parts) == {"loss/critic"}
    torch.testing.assert_close(res.total, rc.critic_weight * res.parts["loss/critic"], rtol=1e-14, atol=0)
    assert set(step.pop_times()) == {"rollout", "critic_grad"}
    res.loss.sum().backward()
    assert all(p.grad is not None for p in nets["critic"].parameters())
    assert all(p.grad is None for p in nets["student"].parameters())
    with pytest.raises(ValueError, match="phase must be 'student' or 'critic', got 'teacher'"):
        step.run("teacher", mb, 0)
