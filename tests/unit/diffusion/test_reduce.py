"""Per-sample reductions with latents sharded over 2 gloo ranks equal the unsharded computation."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_rcm.diffusion import (
    RCMConfig,
    TrigFlowWrapper,
    dmd_gradient,
    process_group_sum,
    scm_target,
    sharded_noise_fn,
)

from ._nets import SCALE, GaussianTeacher


def _tensors():
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 8)  # [B, C, L]: shard the token axis L
    F_minus, dF, F_teacher, x_t, x0 = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(5))
    t = torch.tensor([0.3, 1.0, 1.4], dtype=torch.float64)
    F_teacher[1, 0, 6] = float("nan")  # lives on rank 1's shard only
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return F_minus, dF, F_teacher, x_t, x0, t, eps


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sum_fn = process_group_sum(dist.group.WORLD)
        F_minus, dF, F_teacher, x_t, x0, t, eps = _tensors()
        shard = lambda x: x.chunk(world, dim=-1)[rank]  # noqa: E731
        g_full, valid_full = scm_target(F_minus, dF, F_teacher, x_t, t, 0.7)
        g_local, valid_local = scm_target(*(shard(x) for x in (F_minus, dF, F_teacher, x_t)), t, 0.7, sum_fn=sum_fn)
        assert valid_full.tolist() == [True, False, True]
        assert torch.equal(valid_local, valid_full)  # rank 0 masks sample 1 although its shard is finite
        torch.testing.assert_close(g_local, shard(g_full), rtol=1e-13, atol=1e-15)

        mu = torch.zeros(2, 1, dtype=torch.float64)
        teacher = TrigFlowWrapper(GaussianTeacher(mu, 0.5), timestep_scale=SCALE)
        critic = TrigFlowWrapper(GaussianTeacher(mu + 0.3, 0.5), timestep_scale=SCALE)
        config = RCMConfig(guidance=1.0)
        full = dmd_gradient(teacher, critic, x0, None, None, config, t=t, noise_fn=lambda _: eps)
        local = dmd_gradient(teacher, critic, shard(x0), None, None, config, t=t, noise_fn=lambda _: shard(eps), sum_fn=sum_fn)
        torch.testing.assert_close(local.grad, shard(full.grad), rtol=1e-13, atol=1e-15)
        # without the hook the normaliser is per shard, which differs
        wrong = dmd_gradient(teacher, critic, shard(x0), None, None, config, t=t, noise_fn=lambda _: shard(eps))
        assert (wrong.grad - shard(full.grad)).abs().max() > 1e-3
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_reductions_match_unsharded():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init")), nprocs=2, join=True)


def test_sharded_noise_is_the_full_draw_split():
    like = torch.zeros(2, 3, 4, dtype=torch.float64)
    full = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    shards = [sharded_noise_fn(torch.Generator().manual_seed(5), -1, r, 3)(like) for r in range(3)]
    assert torch.equal(torch.cat(shards, dim=-1), full)
