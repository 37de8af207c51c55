"""Every recompute policy of the DiT blocks (training/recompute.py) across ranks (2 gloo processes):
TP=2 with sequence parallelism, CP=2 over a ring and over all-to-all. The loss equals the plain blocks' bitwise and
every gradient within 1e-12 (float64), with the collectives of the checkpointed blocks run again in the backward.
SDPA's CPU kernel stands in for the fused attention of half-precision CUDA runs (the op selective recomputation
keeps; the ring's per-block attention is the math path on CPU)."""

import pytest
import torch

from megatron_rcm.parallel import run_on_ranks

pytestmark = pytest.mark.distributed


def _sdpa(q, k, v, *, scale=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _policies_agree(plan):
    from megatron_rcm.models import WanModel, blocks
    from megatron_rcm.models.wan import PRESETS
    from megatron_rcm.parallel import destroy_parallel, initialize_parallel
    from megatron_rcm.training.recompute import enable_activation_checkpointing

    blocks.attention = _sdpa  # this process only
    config = PRESETS["wan-tiny-tp"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 10, generator=g, dtype=torch.float64)  # 60 tokens: TP and CP 2 divide them
    t = torch.tensor([100.0, 700.0], dtype=torch.float64)
    text = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    for tp, cp, cases in plan:
        initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        for comm, sp in cases:
            torch.manual_seed(0)
            state = WanModel(config, params_dtype=torch.float64, sequence_parallel=sp, cp_comm=comm).state_dict()
            runs = {}
            for policy in (None, "full", "selective", "selective_self"):
                net = WanModel(config, params_dtype=torch.float64, perform_initialization=False, sequence_parallel=sp,
                               cp_comm=comm)
                net.load_state_dict(state)
                if policy is not None:
                    enable_activation_checkpointing(net, policy)
                loss = (net(x, t, text) ** 2).sum()
                loss.backward()
                runs[policy] = loss.detach(), [(n, p.grad) for n, p in net.named_parameters()]
            loss, grads = runs[None]
            for policy in ("full", "selective", "selective_self"):
                assert torch.equal(runs[policy][0], loss), (tp, cp, comm, policy)
                for (name, a), (_, b) in zip(runs[policy][1], grads):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item(),
                                               msg=f"{(tp, cp, comm, policy)} {name}")
    destroy_parallel()


def test_policies_agree_under_tensor_and_context_parallelism():
    # (TP, CP, [(cp_comm, sequence parallel)])
    run_on_ranks(_policies_agree, 2, [(2, 1, [("auto", True)]), (1, 2, [("a2a", False), ("ring", False)])])
