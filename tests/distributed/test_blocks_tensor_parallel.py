"""The shared Attention block (per-head q/k norm, self- and cross-attention) at TP=2 + SP equals TP=1, grads too."""

import pytest
import torch

from megatron_rcm.parallel import run_on_ranks

pytestmark = pytest.mark.distributed


def _run(out_file, tp):
    from megatron_rcm.checkpoint.sharding import gather_grads, load_full_state_dict
    from megatron_rcm.models.blocks import Attention, AttentionConfig, build_parallel_config
    from megatron_rcm.parallel import initialize_parallel, tp_rank

    initialize_parallel(tensor_model_parallel_size=tp)
    cfg = build_parallel_config(torch.float64, sequence_parallel=tp > 1)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleDict({
        "self": Attention(AttentionConfig(16, 4, 4, qk_norm="per_head"), cfg),
        "cross": Attention(AttentionConfig(16, 4, 4, qk_norm="per_head", context_dim=16), cfg),
    })
    g = torch.Generator().manual_seed(1)
    full = {n: torch.randn(p.shape[0] * (tp if getattr(p, "partition_dim", None) == 0 else 1),
                           *[s * (tp if getattr(p, "partition_dim", None) == i + 1 else 1)
                             for i, s in enumerate(p.shape[1:])], generator=g, dtype=torch.float64)
            for n, p in blocks.named_parameters()} if tp == 1 else torch.load(out_file + ".params")
    if tp == 1:
        torch.save(full, out_file + ".params")
    load_full_state_dict(blocks, full)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, 16, generator=g, dtype=torch.float64)  # [s, b, h]
    ctx = torch.randn(5, 2, 16, generator=g, dtype=torch.float64)
    w = torch.randn(6, 2, 16, generator=g, dtype=torch.float64)
    xs = x.chunk(tp)[tp_rank()] if tp > 1 else x
    ws = w.chunk(tp)[tp_rank()] if tp > 1 else w
    y = blocks["self"](xs)[0]
    y = y + blocks["cross"](y, context=ctx)[0]
    (y * ws).sum().backward()
    outs = [torch.empty_like(y) for _ in range(tp)]
    torch.distributed.all_gather(outs, y.detach().contiguous())
    result = {"out": torch.cat(outs), "grads": gather_grads(blocks)}
    if tp_rank() == 0:
        torch.save(result, out_file + f".tp{tp}")


def test_per_head_norm_attention_tp2_sp_matches_tp1(tmp_path):
    f = str(tmp_path / "attn")
    run_on_ranks(_run, 1, f, 1)
    run_on_ranks(_run, 2, f, 2)
    a, b = torch.load(f + ".tp1"), torch.load(f + ".tp2")
    torch.testing.assert_close(b["out"], a["out"], rtol=1e-10, atol=1e-12)
    assert set(a["grads"]) == set(b["grads"])
    for name in a["grads"]:
        torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-10, atol=1e-12, msg=name)
