"""Selective recomputation (training/recompute.py) on CUDA in bf16 with the fused regions compiled: the SDPA forwards
of a checkpointed block run once under `selective` (cross-attention's twice under `selective_self`, both twice
under `full`), the compiled regions stay
compiled inside the selective-checkpoint region (Triton kernels in the backward; no recompilation on the next
pass), and the gradients are those of full recomputation and of the plain blocks."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.gpu


class _AttentionCalls(TorchDispatchMode):
    """Counts the attention forwards selective recomputation keeps; lets torch.compile through, as the selective
    checkpoint's own modes do."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    @classmethod
    def ignore_compile_internals(cls):
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from megatron_rcm.training.recompute import keeps_output

        self.calls += keeps_output(func)
        return func(*args, **(kwargs or {}))


def _close(a, b) -> bool:
    return (a.double() - b.double()).norm().item() <= 1e-2 * b.double().norm().item() + 1e-6


def test_selective_runs_each_attention_forward_once_and_keeps_the_regions_compiled(monkeypatch):
    from megatron_rcm.models import attention as attention_module

    monkeypatch.setenv("RCM_ATTENTION_BACKEND", "sdpa")  # SDPA (cuDNN first), not FlashAttention-3 if installed
    monkeypatch.setenv("RCM_FUSION", "1")
    attention_module.attention_backend.cache_clear()
    try:
        _check_policies()
    finally:
        attention_module.attention_backend.cache_clear()  # the next test reads its own environment


def _check_policies():
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from megatron_rcm.models.wan import PRESETS, WanModel
    from megatron_rcm.training.recompute import enable_activation_checkpointing

    cfg = dataclasses.replace(PRESETS["wan2.1-t2v-1.3b"], num_layers=2, num_attention_heads=4, ffn_dim=1024,
                              text_dim=256)
    torch.manual_seed(0)
    state = WanModel(cfg, params_dtype=torch.bfloat16).state_dict()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, 5, 30, 26, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.tensor([700.0], device="cuda")
    text = torch.randn(1, 77, cfg.text_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    runs = {}
    for policy in (None, "full", "selective", "selective_self"):
        torch._dynamo.reset()  # each policy compiles its regions afresh, as a training run's first with-grad pass
        net = WanModel(cfg, params_dtype=torch.bfloat16, perform_initialization=False).cuda()
        net.load_state_dict(state)
        if policy is not None:
            enable_activation_checkpointing(net, policy)
        for second in (False, True):  # the first pass compiles; the second must reuse what it compiled
            net.zero_grad(set_to_none=True)
            forward, backward = _AttentionCalls(), _AttentionCalls()
            with torch._dynamo.config.patch(error_on_recompile=second):
                with forward:
                    loss = (net(x, t, text).float() ** 2).mean()
                with backward, profile(activities=[ProfilerActivity.CUDA]) as prof:
                    loss.backward()
                    torch.cuda.synchronize()
        triton = sum("triton" in e.name.lower() for e in prof.events() if e.device_type == DeviceType.CUDA)
        runs[policy] = (forward.calls, backward.calls, triton, [p.grad.float() for p in net.parameters()])
    n = cfg.num_layers  # self- and cross-attention calls each
    assert {p: r[0] for p, r in runs.items()} == dict.fromkeys(runs, 2 * n)
    assert {p: r[1] for p, r in runs.items()} == {None: 0, "full": 2 * n, "selective": 0, "selective_self": n}
    assert all(r[2] > 0 for r in runs.values()), {p: r[2] for p, r in runs.items()}  # compiled, not eager
    for policy in ("selective", "selective_self"):
        for (name, _), a, b, c in zip(net.named_parameters(), runs[policy][3], runs["full"][3], runs[None][3]):
            assert _close(a, b) and _close(a, c), (policy, name)
