"""Samplers on the exact Gaussian velocity: the PF-ODE maps noise eps to mu + std * eps, so every sample's
endpoint is known."""

import pytest
import torch

from megatron_rcm.diffusion import (
    TrigFlowWrapper,
    euler_sample,
    flow_sigmas,
    student_sample,
    teacher_sample,
    unipc_sample,
)

from ._nets import SCALE, GaussianConsistencyStudent, GaussianTeacher, MLPVelocity

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
STD = 0.3
TEACHER = TrigFlowWrapper(GaussianTeacher(MU, STD), timestep_scale=SCALE)
NOISE = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
EXACT = MU + STD * NOISE


def _err(x):
    return (x - EXACT).abs().max().item()


def test_flow_sigmas_with_shift():
    s = flow_sigmas(4, shift=3.0)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(s, 3 * u / (1 + 2 * u))


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_euler_with_many_steps_lands_on_the_data_distribution(shift):
    x = euler_sample(TEACHER, NOISE, None, 500, shift=shift)
    assert _err(x) < (1e-2 if shift == 1.0 else 3e-2)
    torch.testing.assert_close(x.mean(0), MU, rtol=0, atol=0.02)
    torch.testing.assert_close(x.std(0), torch.full((2,), STD, dtype=torch.float64), rtol=0, atol=0.01)


def _diffusers_unipc(num_steps, shift, order):
    """Reference: diffusers' UniPC scheduler with flow sigmas, stepping on the same velocity."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, solver_order=order, lower_order_final=True
    )
    scheduler.set_timesteps(sigmas=flow_sigmas(num_steps, shift)[:-1].numpy())
    x = NOISE.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        v = TEACHER.net(x, SCALE * scheduler.sigmas[i].double().expand(x.shape[0]), None)
        x = scheduler.step(v, timestep, x).prev_sample
    return x


@pytest.mark.parametrize("order", [1, 2])
def test_unipc_matches_diffusers(order):
    for num_steps, shift in ((8, 1.0), (12, 3.0)):
        ours = unipc_sample(TEACHER, NOISE, None, num_steps, shift=shift, order=order)
        ref = _diffusers_unipc(num_steps, shift, order)
        torch.testing.assert_close(ours, ref.double(), rtol=0, atol=2e-5)  # diffusers keeps sigmas in float32


def test_unipc_beats_euler_which_is_first_order():
    e_euler = [_err(euler_sample(TEACHER, NOISE, None, n)) for n in (10, 20, 40)]
    e_unipc = [_err(unipc_sample(TEACHER, NOISE, None, n)) for n in (10, 20, 40)]
    assert 1.8 < e_euler[0] / e_euler[1] < 2.2 and 1.8 < e_euler[1] / e_euler[2] < 2.2
    assert e_unipc[1] < e_euler[1] / 10 and e_unipc[2] < e_euler[2] / 5
    torch.testing.assert_close(teacher_sample(TEACHER, NOISE, None, 10, "unipc", 3.0), unipc_sample(TEACHER, NOISE, None, 10, 3.0))
    torch.testing.assert_close(teacher_sample(TEACHER, NOISE, None, 10, "euler", 3.0), euler_sample(TEACHER, NOISE, None, 10, 3.0))


def test_teacher_sampler_guidance_one_equals_conditional():
    net = MLPVelocity(dim=2)
    model = TrigFlowWrapper(net, timestep_scale=SCALE)
    text = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    neg = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for solver in ("euler", "unipc"):
        cond = teacher_sample(model, NOISE[:8], text, 6, solver, shift=2.0)
        w1 = teacher_sample(model, NOISE[:8], text, 6, solver, shift=2.0, guidance=1.0, neg_text=neg)
        w3 = teacher_sample(model, NOISE[:8], text, 6, solver, shift=2.0, guidance=3.0, neg_text=neg)
        torch.testing.assert_close(w1, cond, rtol=0, atol=1e-12)
        assert (w3 - cond).abs().max() > 1e-3


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4])
def test_student_sampler_with_the_exact_consistency_function(num_steps):
    student = TrigFlowWrapper(GaussianConsistencyStudent(MU, STD), timestep_scale=SCALE)
    x = student_sample(student, NOISE, None, num_steps, sigma_max=1600.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x.mean(0), MU, rtol=0, atol=0.02)
    torch.testing.assert_close(x.std(0), torch.full((2,), STD, dtype=torch.float64), rtol=0, atol=0.01)
    if num_steps == 1:  # one step from (almost) pure noise is the ODE endpoint of that noise
        assert _err(x) < 1e-3
