"""Score-distillation regularizer and critic against Gaussian closed forms."""

import math

import pytest
import torch

from megatron_rcm.diffusion import (
    RCMConfig,
    TrigFlowWrapper,
    critic_inputs,
    critic_loss,
    dmd_gradient,
    dmd_loss,
    dmd_surrogate_loss,
    student_rollout,
)

from ._nets import SCALE, GaussianConsistencyStudent, GaussianTeacher

STD = 0.5
MU_DATA = torch.tensor([0.7, -1.3], dtype=torch.float64)
MU_STUDENT = torch.tensor([0.2, -0.9], dtype=torch.float64)
CONFIG = RCMConfig(guidance=1.0)


def _posterior_x0(x_t, t, mu):
    """E[x0 | x_t] for x0 ~ N(mu, STD^2 I), x_t = cos t x0 + sin t eps."""
    c, sn = torch.cos(t)[:, None], torch.sin(t)[:, None]
    return mu + c * STD**2 / (c**2 * STD**2 + sn**2) * (x_t - c * mu)


def _wrap(net):
    return TrigFlowWrapper(net, timestep_scale=SCALE)


def test_dmd_gradient_matches_closed_form():
    teacher, critic = _wrap(GaussianTeacher(MU_DATA, STD)), _wrap(GaussianTeacher(MU_STUDENT, STD))
    g = torch.Generator().manual_seed(0)
    x0_student = torch.randn(16, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 2, generator=g, dtype=torch.float64)
    t = torch.linspace(0.1, 1.5, 16, dtype=torch.float64)
    out = dmd_gradient(teacher, critic, x0_student, None, None, CONFIG, t=t, noise_fn=lambda _: eps)
    x_t = torch.cos(t)[:, None] * x0_student + torch.sin(t)[:, None] * eps
    x0_T, x0_C = _posterior_x0(x_t, t, MU_DATA), _posterior_x0(x_t, t, MU_STUDENT)
    norm = (x0_student - x0_T).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(out.x0_teacher, x0_T, rtol=1e-12, atol=1e-12)
    # the default 'per_sample' mode scales the reference's per-element gradient by sqrt(Wan 480p elements / 2)
    per_sample = math.sqrt(16 * 21 * 60 * 104 / 2)
    torch.testing.assert_close(out.grad, per_sample * (x0_C - x0_T) / norm, rtol=1e-11, atol=1e-11)
    paper = dmd_gradient(teacher, critic, x0_student, None, None, RCMConfig(guidance=1.0,
                         dmd_weight_mode="paper"), t=t, noise_fn=lambda _: eps)
    torch.testing.assert_close(paper.grad, (x0_C - x0_T) / norm, rtol=1e-11, atol=1e-11)
    # critic == teacher: no gradient
    same = dmd_gradient(teacher, teacher, x0_student, None, None, CONFIG, t=t, noise_fn=lambda _: eps)
    assert same.grad.abs().max() == 0


def test_dmd_loss_and_surrogate_have_gradient_two_times_grad():
    teacher, critic = _wrap(GaussianTeacher(MU_DATA, STD)), _wrap(GaussianTeacher(MU_STUDENT, STD))
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0[3, 0] = float("nan")
    out = dmd_gradient(teacher, critic, x0, None, None, CONFIG, generator=torch.Generator().manual_seed(2))
    assert out.valid.tolist() == [i != 3 for i in range(8)]
    for loss_fn in (dmd_loss, dmd_surrogate_loss):
        x = x0.clone().requires_grad_(True)
        loss = loss_fn(x, out)
        assert torch.isfinite(loss).all() and loss[3] == 0
        loss.sum().backward()
        torch.testing.assert_close(x.grad, 2 * out.grad, rtol=0, atol=1e-14)
        assert (x.grad[3] == 0).all()
    torch.testing.assert_close(dmd_loss(x0, out)[[0, 1]], (out.grad[[0, 1]] ** 2).sum(1))


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4])
def test_rollout_of_an_exact_student_samples_its_distribution_and_the_exact_critic_loss(num_steps):
    """An exact consistency student of N(mu', std^2) samples N(mu', std^2) at any N; the critic loss of the exact
    critic for that distribution is, in expectation, d * std^2 / (cos^2 t std^2 + sin^2 t) per sample."""
    student = _wrap(GaussianConsistencyStudent(MU_STUDENT, STD))
    like = torch.zeros(20000, 2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(10 + num_steps)
    x, t = student_rollout(student, like, None, num_steps, CONFIG, gen)
    if num_steps == 1:
        assert (t == math.pi / 2).all()
    else:
        assert (t < math.pi / 2).all()
    x0 = student(x, t).x0
    torch.testing.assert_close(x0.mean(0), MU_STUDENT, rtol=0, atol=0.02)
    torch.testing.assert_close(x0.std(0), torch.full((2,), STD, dtype=torch.float64), rtol=0, atol=0.02)

    inputs = critic_inputs(student, like, None, num_steps, CONFIG, gen)
    c, sn = torch.cos(inputs.t), torch.sin(inputs.t)
    expected = 2 * STD**2 / (c**2 * STD**2 + sn**2)
    exact = critic_loss(_wrap(GaussianTeacher(MU_STUDENT, STD))(inputs.x_t, inputs.t).x0, inputs)
    ratio = exact.sum() / expected.sum()
    assert abs(ratio.item() - 1) < 0.05
    wrong = critic_loss(_wrap(GaussianTeacher(MU_DATA, STD))(inputs.x_t, inputs.t).x0, inputs)
    assert wrong.mean() > 1.5 * exact.mean()
