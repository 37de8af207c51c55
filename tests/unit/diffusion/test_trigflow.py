"""TrigFlow <-> rectified-flow maps, the wrapper's chained JVP, and classifier-free guidance."""

import math

import torch

from megatron_rcm.diffusion import (
    TrigFlowWrapper,
    classifier_free_guidance,
    rf_state_from_trigflow,
    rf_time_from_trigflow,
    trigflow_from_velocity,
    trigflow_state_from_rf,
    trigflow_time_from_rf,
    velocity_from_trigflow,
    x0_from_trigflow,
)

from ._nets import SCALE, MLPVelocity

G = torch.Generator().manual_seed(0)


def _t(n):
    return torch.rand(n, generator=G, dtype=torch.float64) * (math.pi / 2 - 0.02) + 0.01


def test_time_and_state_maps_invert_each_other():
    t = torch.cat([_t(64), torch.tensor([0.0, math.pi / 2], dtype=torch.float64)])
    s = rf_time_from_trigflow(t)
    torch.testing.assert_close(trigflow_time_from_rf(s), t, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.tan(t[:-1]), s[:-1] / (1 - s[:-1]), rtol=1e-12, atol=1e-12)  # equal SNR
    x = torch.randn(66, 3, 5, generator=G, dtype=torch.float64)
    torch.testing.assert_close(trigflow_state_from_rf(rf_state_from_trigflow(x, t), s), x, rtol=1e-13, atol=1e-13)


def test_states_and_velocities_agree_for_one_draw():
    """x_s = (1-s) x0 + s eps is the RF state of x_t = cos t x0 + sin t eps, and v = eps - x0 maps to
    F = cos t eps - sin t x0 (the TrigFlow velocity of this very draw) and x0 back to x0."""
    n = 32
    t = _t(n)
    s = rf_time_from_trigflow(t)
    x0 = torch.randn(n, 4, generator=G, dtype=torch.float64)
    eps = torch.randn(n, 4, generator=G, dtype=torch.float64)
    c, sn = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = c * x0 + sn * eps
    torch.testing.assert_close(rf_state_from_trigflow(x_t, t), (1 - s[:, None]) * x0 + s[:, None] * eps)
    F = trigflow_from_velocity(eps - x0, x_t, t)
    torch.testing.assert_close(F, c * eps - sn * x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0_from_trigflow(F, x_t, t), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(velocity_from_trigflow(F, x_t, t), eps - x0, rtol=1e-12, atol=1e-12)


def test_wrapper_prediction_and_jvp_match_autodiff():
    net = MLPVelocity(dim=6)
    model = TrigFlowWrapper(net, timestep_scale=SCALE)
    n = 5
    x = torch.randn(n, 2, 3, generator=G, dtype=torch.float64)
    t = _t(n)
    text = torch.randn(n, 3, 4, generator=G, dtype=torch.float64)
    tx = torch.randn_like(x)
    tt = torch.randn(n, generator=G, dtype=torch.float64)

    def F_of(x_, t_):
        v = net(x_ / (torch.cos(t_) + torch.sin(t_))[:, None, None], SCALE * torch.sin(t_) / (torch.cos(t_) + torch.sin(t_)), text)
        x_s = x_ / (torch.cos(t_) + torch.sin(t_))[:, None, None]
        x0 = x_s - (torch.sin(t_) / (torch.cos(t_) + torch.sin(t_)))[:, None, None] * v
        return (torch.cos(t_)[:, None, None] * x_ - x0) / torch.sin(t_)[:, None, None]

    F_ref, dF_ref = torch.func.jvp(F_of, (x, t), (tx, tt))
    pred, dF = model.jvp(x, t, text, tx, tt)
    torch.testing.assert_close(pred.F, F_ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(dF, dF_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(x, t, text).F, F_ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(pred.x0, x0_from_trigflow(F_ref, x, t), rtol=1e-11, atol=1e-11)


def test_wrapper_runs_network_in_its_dtype_and_returns_float64():
    net64 = MLPVelocity(dim=6, dtype=torch.float64)
    net32 = MLPVelocity(dim=6, dtype=torch.float32)
    seen = {}
    net32.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].dtype, ts=args[1].dtype))
    x, t = torch.randn(4, 6, generator=G, dtype=torch.float64), _t(4)
    p32 = TrigFlowWrapper(net32, timestep_scale=SCALE)(x, t)
    p64 = TrigFlowWrapper(net64, timestep_scale=SCALE)(x, t)
    assert seen == {"x": torch.float32, "ts": torch.float32}
    assert p32.F.dtype == torch.float64
    torch.testing.assert_close(p32.F, p64.F, rtol=1e-4, atol=1e-4)


def test_cfg_weight_one_is_the_conditional_prediction_and_batching_is_exact():
    model = TrigFlowWrapper(MLPVelocity(dim=6), timestep_scale=SCALE)
    n = 4
    x, t = torch.randn(n, 6, generator=G, dtype=torch.float64), _t(n)
    text = torch.randn(n, 3, 4, generator=G, dtype=torch.float64)
    neg = torch.randn(1, 3, 4, generator=G, dtype=torch.float64)
    cond, uncond = model(x, t, text), model(x, t, neg.expand(n, 3, 4))
    assert (cond.F - uncond.F).abs().max() > 1e-2  # the two prompts really differ
    for batched in (True, False):
        w1 = model.guided(x, t, text, neg, 1.0, batched=batched)
        torch.testing.assert_close(w1.F, cond.F, rtol=0, atol=1e-13)
        torch.testing.assert_close(w1.x0, cond.x0, rtol=0, atol=1e-13)
        w0 = model.guided(x, t, text, neg, 0.0, batched=batched)
        torch.testing.assert_close(w0.F, uncond.F, rtol=0, atol=1e-13)
    w5 = model.guided(x, t, text, neg, 5.0)
    torch.testing.assert_close(w5.F, uncond.F + 5.0 * (cond.F - uncond.F), rtol=1e-13, atol=1e-13)
    # x0 guidance equals the x0 of the guided F (both are affine in v with the same coefficients)
    torch.testing.assert_close(w5.x0, x0_from_trigflow(w5.F, x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(classifier_free_guidance(torch.tensor(3.0), torch.tensor(1.0), 4.5), torch.tensor(10.0))
