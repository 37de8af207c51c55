"""The CPU optimizer path: AdamW settings, LR warm-up, NaN grads zeroed and counted, skipped steps."""

import pytest
import torch

from megatron_rcm.parallel import destroy_parallel, initialize_parallel
from megatron_rcm.training.config import OptimizerConfig
from megatron_rcm.training.trainable import TorchTrainable


@pytest.fixture(autouse=True)
def one_process_world():
    initialize_parallel()
    yield
    destroy_parallel()


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()


def _reference_adamw(params, grads, lr, cfg, state, step):
    # torch.optim.AdamW's update written out (decoupled weight decay, bias correction)
    out = []
    for p, g, (m, v) in zip(params, grads, state):
        p = p * (1 - lr * cfg.weight_decay)
        m.mul_(cfg.adam_beta1).add_(g, alpha=1 - cfg.adam_beta1)
        v.mul_(cfg.adam_beta2).addcmul_(g, g, value=1 - cfg.adam_beta2)
        mh = m / (1 - cfg.adam_beta1 ** step)
        vh = v / (1 - cfg.adam_beta2 ** step)
        out.append(p - lr * mh / (vh.sqrt() + cfg.adam_eps))
    return out


def test_steps_match_adamw_with_linear_warmup_and_nan_grads_zeroed():
    cfg = OptimizerConfig(student_lr=1e-2, lr_warmup_iters=4)
    net = _net()
    t = TorchTrainable("student", net, cfg.student_lr, cfg, train_iters=10)
    ref = [p.detach().clone() for p in net.parameters()]
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ref]
    x = torch.randn(5, 4, dtype=torch.float64)
    for step in range(1, 4):
        t.zero_grad()
        net(x).pow(2).sum().backward()
        list(net.parameters())[0].grad[0, 0] = float("nan")
        list(net.parameters())[1].grad[1] = float("inf")
        grads = [p.grad.clone().nan_to_num(0.0, 0.0, 0.0) for p in net.parameters()]
        expected_norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        result = t.step()
        lr = cfg.student_lr * step / cfg.lr_warmup_iters
        assert result.lr == pytest.approx(lr) and result.num_nan_grads == 2 and not result.skipped
        assert result.grad_norm == pytest.approx(expected_norm)
        ref = _reference_adamw(ref, grads, lr, cfg, state, step)
        for p, r in zip(net.parameters(), ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)


def test_skipped_step_changes_nothing():
    cfg = OptimizerConfig(student_lr=1e-2, lr_warmup_iters=0)
    net = _net()
    t = TorchTrainable("student", net, cfg.student_lr, cfg, train_iters=10)
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    result = t.step(skip=True)
    assert result.skipped and t.scheduler.num_steps == 0
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("foreach", [True, False])
def test_resumed_adam_with_one_shared_step_tensor_keeps_the_trajectory_once_steps_are_separated(foreach):
    import copy

    from megatron_rcm.training.trainable import separate_adam_steps

    gen = torch.Generator().manual_seed(0)
    net = _net()
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in net.parameters()] for _ in range(3)]

    def step(opt, params, g):
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()

    opt = torch.optim.Adam(net.parameters(), lr=1e-2, foreach=foreach)
    for g in grads[:2]:
        step(opt, net.parameters(), g)
    saved = copy.deepcopy(opt.state_dict())
    shared = torch.tensor(2.0)
    for s in saved["state"].values():  # what megatron-core's DistributedOptimizer.load_state_dict hands torch
        s["step"] = shared
    resumed = {}
    for separate in (True, False):
        copy_net = copy.deepcopy(net)
        o = torch.optim.Adam(copy_net.parameters(), lr=1e-2, foreach=foreach)
        o.load_state_dict(copy.deepcopy(saved))  # one copy keeps the step tensor shared
        if separate:
            separate_adam_steps(o)
        step(o, copy_net.parameters(), grads[2])
        resumed[separate] = (copy_net, o)
    step(opt, net.parameters(), grads[2])

    copy_net, o = resumed[True]
    assert [s["step"].item() for s in o.state.values()] == [3.0] * 4
    for a, b in zip(net.parameters(), copy_net.parameters()):
        assert torch.equal(a, b)
    # without the separation the one step tensor advances once per parameter and the update differs
    copy_net, o = resumed[False]
    assert [s["step"].item() for s in o.state.values()] == [6.0] * 4
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), copy_net.parameters()))
