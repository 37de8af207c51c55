"""models/dit.py's pipeline stages in one process: global block names, the refused split without pipeline parallelism,
and the stage entry point at PP=1 (one stage is first and last: `stage_forward` is `forward_tokens` / `jvp_tokens`).
The block split is tested in tests/unit/parallel/test_pipeline.py, the multi-stage runs in
tests/distributed/test_pipeline_parallel.py."""

import dataclasses

import pytest
import torch

from megatron_rcm.models import WAN_PRESETS, WanModel
from megatron_rcm.models.dit import StageBlocks

F64 = torch.float64


def test_stage_blocks_keep_global_names():
    blocks = StageBlocks([torch.nn.Linear(2, 2) for _ in range(2)], first=3)
    assert [n for n, _ in blocks.named_parameters()] == ["3.weight", "3.bias", "4.weight", "4.bias"]
    assert len(blocks) == 2 and blocks[1] is list(blocks)[1]


def _model():
    torch.manual_seed(0)
    return WanModel(dataclasses.replace(WAN_PRESETS["wan-tiny"], num_layers=3), params_dtype=F64)


def test_pipeline_layers_without_pipeline_parallelism_is_refused():
    with pytest.raises(ValueError, match="pipeline_layers \\[1, 2\\] given without pipeline parallelism"):
        WanModel(dataclasses.replace(WAN_PRESETS["wan-tiny"], num_layers=3), pipeline_layers=[1, 2])


def test_one_stage_entry_point_is_the_sharded_pass():
    model = _model()
    assert model.stage.is_first and model.stage.is_last and model.stage.num_layers == 3
    assert not any(getattr(p, "pipeline_replicated", False) for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 1, 4, 6, generator=g, dtype=F64)
    t = torch.rand(2, generator=g, dtype=F64) * 1000
    text = torch.randn(2, 5, 16, generator=g, dtype=F64)
    tx, tt = torch.randn(x.shape, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)
    layout = model.token_layout(x.shape)
    assert model.stage_activation_shape(layout) == (6, 2, 24)
    assert model.stage_activation_shape(layout, jvp=True) == (6, 4, 24)
    y = model.stage_forward(layout.shard(x), t, text, layout)
    assert y.requires_grad
    assert torch.equal(y, model.forward_tokens(layout.shard(x), t, text, layout))
    y, ty = model.stage_forward(layout.shard(x), t, text, layout, jvp=True, tokens_tangent=layout.shard(tx),
                                timestep_tangent=tt)
    ey, ety = model.jvp_tokens(layout.shard(x), t, text, layout, layout.shard(tx), tt)
    assert torch.equal(y, ey) and torch.equal(ty, ety) and ety.abs().max() > 1e-3
    with pytest.raises(ValueError, match="tokens must be this rank's"):
        model.stage_forward(layout.shard(x)[:, :3], t, text, layout)


def test_set_input_tensor_takes_megatron_lists():
    model = _model()
    a = torch.ones(1)
    model.set_input_tensor([a])
    assert model._input_tensor is a
    model.set_input_tensor(None)
    assert model._input_tensor is None
