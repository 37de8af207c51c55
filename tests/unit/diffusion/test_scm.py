"""sCM target against closed forms: Gaussian data N(mu, std^2 I) has an analytic PF-ODE and consistency function."""

import math

import pytest
import torch

from megatron_rcm.diffusion import RCMConfig, TrigFlowWrapper, scm_loss, scm_target, scm_targets, trigflow_noise

from ._nets import SCALE, GaussianConsistencyStudent, GaussianTeacher

MU = torch.tensor([0.7, -1.3, 0.2], dtype=torch.float64)
STD = 0.5
CONFIG = RCMConfig(guidance=1.0)


def _draw(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + STD * torch.randn(n, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.05, math.pi / 2 - 0.02, n, dtype=torch.float64)
    return x0, eps, t


def _analytic_F_and_dFdt(x_t, t):
    """Exact consistency student's F = (cos t x_t - f) / sin t and its derivative along the teacher's ODE."""
    c, sn = torch.cos(t)[:, None], torch.sin(t)[:, None]
    sig = torch.sqrt(c**2 * STD**2 + sn**2)
    dsig = c * sn * (1 - STD**2) / sig
    z = (x_t - c * MU) / sig  # constant along the ODE
    h = (c * sig - STD) / sn
    dh = ((-sn * sig + c * dsig) * sn - (c * sig - STD) * c) / sn**2
    return -sn * MU + z * h, -c * MU + z * dh


def _models(student_mu=MU, learnable=False):
    teacher = TrigFlowWrapper(GaussianTeacher(MU, STD), timestep_scale=SCALE)
    student = TrigFlowWrapper(GaussianConsistencyStudent(student_mu, STD, learnable), timestep_scale=SCALE)
    return teacher, student


def test_exact_student_gives_zero_target_and_analytic_tangent():
    teacher, student = _models()
    x0, eps, t = _draw(64)
    targets = scm_targets(student, teacher, x0, None, None, CONFIG, warmup_ratio=1.0, t=t, noise_fn=lambda _: eps)
    F_exact, dFdt = _analytic_F_and_dFdt(targets.x_t, t)
    torch.testing.assert_close(targets.x_t, trigflow_noise(x0, eps, t), rtol=0, atol=0)
    torch.testing.assert_close(targets.F_minus, F_exact, rtol=1e-11, atol=1e-11)
    cs = (torch.cos(t) * torch.sin(t))[:, None]
    torch.testing.assert_close(targets.dF, cs * dFdt, rtol=1e-10, atol=1e-10)
    assert targets.valid.all()
    assert targets.g.abs().max() <= 1e-10
    # the unnormalised target vanishes too (a large norm_eps leaves g ~ raw g / eps)
    raw, _ = scm_target(targets.F_minus, targets.dF, targets.F_teacher, targets.x_t, t, 1.0, norm_eps=1.0)
    assert raw.abs().max() <= 1e-10


def test_target_is_normalised_per_sample_and_warmup_changes_it():
    teacher, student = _models(student_mu=MU + 0.3)
    x0, eps, t = _draw(16)
    tg = scm_targets(student, teacher, x0, None, None, CONFIG, warmup_ratio=1.0, t=t, noise_fn=lambda _: eps)
    c, sn = torch.cos(t)[:, None], torch.sin(t)[:, None]
    raw = -c * torch.sqrt(1 - sn**2) * (tg.F_minus - tg.F_teacher) - (c * sn * tg.x_t + tg.dF)
    torch.testing.assert_close(tg.g, raw / (raw.norm(dim=1, keepdim=True) + 0.1), rtol=1e-12, atol=1e-14)
    assert (tg.g.norm(dim=1) < 1).all()
    # r = 0: g = -cos t (F_minus - F_teacher) (only the tangent-free part)
    g0, _ = scm_target(tg.F_minus, tg.dF, tg.F_teacher, tg.x_t, t, 0.0, norm_eps=0.0)
    ref = -torch.cos(t)[:, None] * (tg.F_minus - tg.F_teacher)
    torch.testing.assert_close(g0, ref / ref.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("delta", [0.3, -0.8])
def test_perturbed_student_target_points_back_to_the_exact_one(delta):
    teacher, student = _models(student_mu=MU + delta)
    x0, eps, t = _draw(64, seed=1)
    tg = scm_targets(student, teacher, x0, None, None, CONFIG, warmup_ratio=1.0, t=t, noise_fn=lambda _: eps)
    F_exact, _ = _analytic_F_and_dFdt(tg.x_t, t)
    assert tg.g.norm(dim=1).min() > 1e-3
    cos_angle = (tg.g * (F_exact - tg.F_minus)).sum(1) / (tg.g.norm(dim=1) * (F_exact - tg.F_minus).norm(dim=1))
    assert cos_angle.min() > 0.99  # collinear here: the error is a t-dependent multiple of mu' - mu


def test_scm_loss_gradient_moves_a_learnable_student_towards_the_exact_one():
    teacher, student = _models(student_mu=MU + torch.tensor([0.4, -0.2, 0.1], dtype=torch.float64), learnable=True)
    x0, eps, t = _draw(64, seed=2)
    tg = scm_targets(student, teacher, x0, None, None, CONFIG, warmup_ratio=1.0, t=t, noise_fn=lambda _: eps)
    mu_param = student.net.mu
    assert mu_param.grad is None  # the JVP pass ran without grad
    F = student(tg.x_t, tg.t).F
    loss = scm_loss(F, tg)
    torch.testing.assert_close(loss.detach(), (tg.g**2).sum(1))  # at F = F_minus the loss is ||g||^2
    loss.sum().backward()
    err = (mu_param - MU).detach()
    assert (mu_param.grad * err).sum() > 0.5 * mu_param.grad.norm() * err.norm()


def test_nan_samples_are_masked():
    teacher, student = _models(student_mu=MU + 0.3, learnable=True)
    x0, eps, t = _draw(8, seed=3)
    x0[2, 1] = float("nan")
    tg = scm_targets(student, teacher, x0, None, None, CONFIG, warmup_ratio=0.5, t=t, noise_fn=lambda _: eps)
    assert tg.valid.tolist() == [i != 2 for i in range(8)]
    assert torch.isfinite(tg.g).all() and (tg.g[2] == 0).all()
    loss = scm_loss(student(tg.x_t, tg.t).F, tg)
    assert loss[2] == 0 and torch.isfinite(loss).all() and (loss[[0, 1, 3]] > 0).all()
    loss.sum().backward()
    assert torch.isfinite(student.net.mu.grad).all()


def test_p_G_draws_come_from_the_generator():
    teacher, student = _models(student_mu=MU + 0.3)
    x0, _, _ = _draw(4)
    a = scm_targets(student, teacher, x0, None, None, CONFIG, 1.0, generator=torch.Generator().manual_seed(7))
    b = scm_targets(student, teacher, x0, None, None, CONFIG, 1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.t, b.t, rtol=0, atol=0)
    torch.testing.assert_close(a.g, b.g, rtol=0, atol=0)
