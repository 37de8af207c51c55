"""Recomputation of the DiT blocks (training/recompute.py) changes memory and time, not numbers: under every policy
the loss, every gradient and the JVP pass equal the plain blocks' (float64, bitwise). Under `selective` no fused
attention forward runs again in the backward (its output and log-sum-exp were kept), under `selective_self` only
cross-attention's does, under `full` all do. On CPU the model's attention is the math path (no fused op: the
selective policies recompute as `full`); SDPA's CPU kernel, of the op family the CUDA path calls, stands in for the
fused attention of half-precision CUDA runs, and a torch custom op for a kernel of our own."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from megatron_rcm.models import WanModel, blocks
from megatron_rcm.models.attention import attention_block_backward, attention_with_lse
from megatron_rcm.parallel import destroy_parallel, initialize_parallel
from megatron_rcm.training import memory, recompute
from megatron_rcm.training.config import TINY_SHAPES_MODEL, load_config

POLICIES = (None, "full", "selective", "selective_self")
BATCH, FRAMES, SIZE, TEXT = 2, 8, 16, 5
TOKENS = FRAMES * (SIZE // 4) ** 2  # patch 1 x 4 x 4


@pytest.fixture(autouse=True)
def parallel():
    initialize_parallel()
    yield
    destroy_parallel()


@torch.library.custom_op("rcm::_test_attention_forward", mutates_args=())
def _test_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused attention forward of our own, registered as a torch op (what a Triton kernel would be wrapped in)."""
    o, lse = attention_with_lse(q, k, v)
    return o.to(q.dtype), lse


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return tuple(g.to(q.dtype) for g in attention_block_backward(do, q, k, v, o, lse))


_test_attention_forward.register_autograd(_backward, setup_context=_setup_context)

ATTENTION = {
    "math": None,  # the model's own path on CPU
    "sdpa": lambda q, k, v, *, scale=None: F.scaled_dot_product_attention(q, k, v, scale=scale),
    "custom_op": lambda q, k, v, *, scale=None: torch.ops.rcm._test_attention_forward(q, k, v)[0],
}


class _AttentionCalls(TorchDispatchMode):
    """Counts the dispatched ops that selective recomputation keeps (the attention forwards)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += recompute.keeps_output(func)
        return func(*args, **(kwargs or {}))


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, FRAMES, SIZE, SIZE, generator=g, dtype=dtype)
    t = torch.tensor([100.0, 800.0], dtype=dtype)
    text = torch.randn(BATCH, TEXT, 16, generator=g, dtype=dtype)
    return x, t, text


def _kept_bytes(monkeypatch) -> list:
    """Wraps the selective policies: the storage bytes of every op output they keep are appended to the list."""
    kept, make_policy = [], recompute.attention_policy

    def counting_policy(self_attention_only):
        policy = make_policy(self_attention_only)

        def counting(ctx, op, *args, **kwargs):
            decision = policy(ctx, op, *args, **kwargs)
            if decision == CheckpointPolicy.MUST_SAVE:
                outs = ctx.op_output if isinstance(ctx.op_output, (tuple, list)) else (ctx.op_output,)
                kept.append(sum(t.untyped_storage().nbytes() for t in outs if isinstance(t, torch.Tensor)))
            return decision

        return counting

    monkeypatch.setattr(recompute, "attention_policy", counting_policy)
    return kept


def _run(state, policy, config=TINY_SHAPES_MODEL, dtype=torch.float64):
    """Loss, parameter grads, attention forwards run in the forward and in the backward, and the count of tensors
    autograd saved, of one with-grad pass of the tiny Wan model under `policy` (None: plain blocks)."""
    net = WanModel(config, params_dtype=dtype, perform_initialization=False)
    net.load_state_dict(state)
    if policy is not None:
        recompute.enable_activation_checkpointing(net, policy)
    x, t, text = _inputs(dtype)
    saved = [0]

    def pack(tensor):
        saved[0] += 1
        return tensor

    forward, backward = _AttentionCalls(), _AttentionCalls()
    with forward, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = (net(x, t, text).double() ** 2).sum()
    with backward:
        loss.backward()
    return loss.detach(), [p.grad for p in net.parameters()], forward.calls, backward.calls, saved[0], net


@pytest.mark.filterwarnings("ignore:A saved_tensors_hooks context")  # the count of saved tensors sits around SAC
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_policies_give_the_same_loss_and_grads_and_only_selective_skips_the_attention_forward(attention, monkeypatch):
    if ATTENTION[attention] is not None:
        monkeypatch.setattr(blocks, "attention", ATTENTION[attention])
    kept = _kept_bytes(monkeypatch)
    torch.manual_seed(0)
    state = WanModel(TINY_SHAPES_MODEL, params_dtype=torch.float64).state_dict()
    runs, kept_by = {}, {}
    for policy in POLICIES:
        kept.clear()
        runs[policy], kept_by[policy] = _run(state, policy), list(kept)
    loss, grads, *_ = runs[None]
    for policy in POLICIES[1:]:
        assert torch.equal(runs[policy][0], loss), policy
        for (name, _), a, b in zip(runs[policy][5].named_parameters(), runs[policy][1], grads):
            assert torch.equal(a, b), (policy, name)
    per_kind = TINY_SHAPES_MODEL.num_layers if attention != "math" else 0  # self- (and cross-) attention calls
    assert {p: r[2] for p, r in runs.items()} == dict.fromkeys(POLICIES, 2 * per_kind)
    assert {p: r[3] for p, r in runs.items()} == {None: 0, "full": 2 * per_kind, "selective": 0,
                                                  "selective_self": per_kind}
    # checkpointed blocks keep their inputs only, as far as autograd's saved tensors go (SAC keeps its own)
    counts = {p: r[4] for p, r in runs.items()}
    assert counts["full"] == counts["selective"] == counts["selective_self"] < counts[None] / 2, counts
    # what is kept: each kept attention call's output [B, H, S, D] and log-sum-exp [B, H, S], float64
    heads, head_dim = TINY_SHAPES_MODEL.num_attention_heads, TINY_SHAPES_MODEL.attention_head_dim
    one = BATCH * heads * TOKENS * (head_dim + 1) * 8
    assert kept_by == {None: [], "full": [], "selective": [one] * 2 * per_kind, "selective_self": [one] * per_kind}


def test_jvp_pass_runs_the_plain_blocks():
    torch.manual_seed(0)
    plain = WanModel(TINY_SHAPES_MODEL, params_dtype=torch.float64)
    x, t, text = _inputs(torch.float64)
    x_tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = plain.jvp(x, t, text, x_tangent, torch.ones(BATCH, dtype=torch.float64))
    for policy in POLICIES[1:]:
        net = WanModel(TINY_SHAPES_MODEL, params_dtype=torch.float64, perform_initialization=False)
        net.load_state_dict(plain.state_dict())
        recompute.enable_activation_checkpointing(net, policy)
        for a, b in zip(net.jvp(x, t, text, x_tangent, torch.ones(BATCH, dtype=torch.float64)), expected):
            assert torch.equal(a, b), policy


def test_which_ops_are_kept():
    aten = torch.ops.aten
    for op in (aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention.default,
               aten._scaled_dot_product_efficient_attention.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default, torch.ops.rcm._test_attention_forward.default):
        assert recompute.keeps_output(op), op
    for op in (aten._scaled_dot_product_flash_attention_backward.default, aten.mm.default, aten._softmax.default,
               aten.scaled_dot_product_attention.default):  # the last: composite, never dispatched to a mode
        assert not recompute.keeps_output(op), op
    # selective_self tells self- from cross-attention by the key count: queries padded by a2a still count as self
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    q, text = torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 3, 4)
    self_only, both = recompute.attention_policy(True), recompute.attention_policy(False)
    assert self_only(None, op, q, q[:, :, :9], q[:, :, :9]) == CheckpointPolicy.MUST_SAVE
    assert self_only(None, op, q, text, text) == CheckpointPolicy.PREFER_RECOMPUTE
    assert both(None, op, q, text, text) == CheckpointPolicy.MUST_SAVE
    assert both(None, aten.mm.default, q[0, 0], text[0, 0].T) == CheckpointPolicy.PREFER_RECOMPUTE
    with pytest.raises(ValueError, match="recompute policy must be one of"):
        recompute.enable_activation_checkpointing(WanModel(TINY_SHAPES_MODEL), "attention")


@pytest.mark.filterwarnings("ignore:A saved_tensors_hooks context")
@pytest.mark.parametrize("policy, calls", [("selective", 2), ("selective_self", 1)])
def test_estimator_selective_term_is_what_the_tiny_model_keeps(policy, calls, monkeypatch):
    """bf16, SDPA (the fused path of half-precision runs): per block and query token, the attention outputs
    (2 bytes x h each) and log-sum-exps (4 bytes x heads each) that the policy keeps."""
    monkeypatch.setattr(blocks, "attention", ATTENTION["sdpa"])
    kept = _kept_bytes(monkeypatch)
    c = dataclasses.replace(TINY_SHAPES_MODEL, num_layers=2)
    torch.manual_seed(0)
    _run(WanModel(c, params_dtype=torch.bfloat16).state_dict(), policy, c, torch.bfloat16)
    config = load_config(None, ["model.params_dtype=bfloat16", "model.activation_checkpointing=true",
                                f"model.recompute_policy={policy}"])
    per_token = memory.selective_attention_bytes(config, memory.layout_of(config, 1))
    assert per_token == calls * (2 * c.hidden_size + 4 * c.num_attention_heads)
    assert sum(kept) == c.num_layers * BATCH * TOKENS * per_token


def test_estimator_counts_the_selective_term_per_block():
    """The with-grad peak under selective = under full + the kept attention tensors of every block but the one
    being recomputed (its attention results are part of the recompute's working set)."""
    base = ["model.params_dtype=bfloat16", "model.activation_checkpointing=true", "rcm.tangent_warmup=0"]
    full = memory.estimate(load_config(None, base), 1)
    c, s = TINY_SHAPES_MODEL, 128  # tiny default: 8 x 16 x 16 pixels, patch 1 x 4 x 4
    per_call = s * (2 * c.hidden_size + 4 * c.num_attention_heads)
    for policy, calls in (("selective", 2), ("selective_self", 1)):
        est = memory.estimate(load_config(None, base + [f"model.recompute_policy={policy}"]), 1)
        for kind, batch in (("student_with_grad", 16), ("critic_with_grad", 8)):  # micro-batch 8; sCM + DMD inputs
            extra = est.activations[kind] - full.activations[kind]
            assert extra == pytest.approx(batch * (c.num_layers - 1) * calls * per_call, rel=1e-12), (policy, kind)
    selective = memory.estimate(load_config(None, base + ["model.recompute_policy=selective"]), 1)
    assert selective.layout.describe().count("activation checkpointing selective") == 1
    assert "model.recompute_policy=selective" in selective.layout.overrides()
    # float32: the math attention has no fused op to keep
    f32 = ["model.activation_checkpointing=true", "model.recompute_policy=selective"]
    assert memory.selective_attention_bytes(load_config(None, f32), memory.layout_of(load_config(None, f32), 1)) == 0
    # a ring over CP 2 keeps one partial output and log-sum-exp per key/value block of self-attention
    config = load_config(None, base + ["model.recompute_policy=selective", "parallel.context_parallel_size=2",
                                       "parallel.cp_comm=ring"])
    lay = memory.layout_of(config, 2)
    assert memory.selective_attention_bytes(config, lay) == 3 * (2 * c.hidden_size + 4 * c.num_attention_heads)
    lay.recompute_policy = "selective_self"
    assert memory.selective_attention_bytes(config, lay) == 2 * (2 * c.hidden_size + 4 * c.num_attention_heads)


def test_smallest_fitting_prefers_selective_over_full_recomputation():
    """1.3B at 480p on one 141 GB GPU: no checkpointing does not fit (it ran out of memory, benchmarks/RESULTS.md);
    by the estimate both selective policies do, and they come before full, which recomputes more."""
    from megatron_rcm.training.scale_probe import PROBE

    config = load_config(None, PROBE + ["training.global_batch_size=1"])
    fitting = memory.smallest_fitting(config, 1, 139.8 * memory.GiB, limit=3)
    assert [e.layout.recompute for e in fitting] == ["selective", "selective_self", "full"]
