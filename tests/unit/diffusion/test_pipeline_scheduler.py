"""diffusion/pipeline_scheduler.py: `RCMScheduler`'s times are the rCM sampler's (fewer steps: a prefix of the same
times), and its step is x0 = x_s - s v re-noised to the next time. A whole `WanPipeline` run against `student_sample`
is tests/unit/checkpoint/test_pipeline.py."""

import math

import pytest
import torch

from megatron_rcm.diffusion.pipeline_scheduler import RCMScheduler, rcm_flow_times


def test_rcm_times_match_our_sampler():
    sched = RCMScheduler()
    # the 4-step schedule on the 0-1000 scale, from the TrigFlow times (arctan 80, 1.3, 1.0, 0.6)
    times = [math.atan(80.0), 1.3, 1.0, 0.6]
    expected = [1000 * math.sin(t) / (math.sin(t) + math.cos(t)) for t in times]
    assert [round(t, 1) for t in expected] == [987.7, 782.7, 609.0, 406.2]
    torch.testing.assert_close(sched.timesteps, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-4)
    for n in (1, 2, 3):  # fewer steps: a prefix of the same times, then 0
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == torch.tensor(expected[:n], dtype=torch.float32).tolist()
        assert sched.sigmas[-1] == 0 and len(sched.sigmas) == n + 1
    with pytest.raises(ValueError, match="num_inference_steps must be in 1..4"):
        sched.set_timesteps(5)


def test_step_predicts_x0_and_renoises_to_the_next_time():
    sched = RCMScheduler(mid_times=(1.0,))
    sched.set_timesteps(2)
    s0, s1 = rcm_flow_times(2, 80.0, (1.0,))[:2]
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    out = sched.step(v, sched.timesteps[0], x, generator=torch.Generator().manual_seed(5))
    x0 = x - s0 * v
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.prev_sample, (1 - s1) * x0 + s1 * fresh, rtol=0, atol=1e-15)
    last, x0_last = sched.step(v, sched.timesteps[1], out.prev_sample, return_dict=False)
    assert torch.equal(last, x0_last)  # the last step lands on its x0 prediction, no noise
    torch.testing.assert_close(last, out.prev_sample - s1 * v, rtol=0, atol=1e-15)
    with pytest.raises(IndexError, match="step called 3 times for a 2-step schedule"):
        sched.step(v, sched.timesteps[1], last)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="sigma_max must be > 0"):
        RCMScheduler(sigma_max=0.0)
    with pytest.raises(ValueError, match="mid_times must be decreasing TrigFlow times"):
        RCMScheduler(mid_times=(1.0, 1.3))
    with pytest.raises(ValueError, match="takes its times from its config"):
        RCMScheduler().set_timesteps(2, sigmas=[1.0, 0.5])
