"""checkpoint/sharding.py in a one-process layout: a full state dict is checked (every problem in one error, nothing
loaded) and copied into megatron-core layers, and read back whole. The tensor-parallel slices are checked against
TP=1 in tests/distributed (test_blocks_tensor_parallel.py, test_wan_tensor_parallel.py, ...)."""

import pytest
import torch

from megatron_rcm.checkpoint.sharding import check_state_dict, full_state_dict, gather_grads, load_full_state_dict
from megatron_rcm.models.blocks import MLP, build_parallel_config
from megatron_rcm.parallel import state


def _model():
    state.ensure_parallel()
    return torch.nn.ModuleDict({"mlp": MLP(4, 6, build_parallel_config(torch.float64, False)),
                                "out": torch.nn.Linear(4, 2, dtype=torch.float64)})


def _full(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(p.shape, generator=g, dtype=dtype) for n, p in model.named_parameters()}


def test_load_then_read_back():
    model = _model()
    full = _full(model)
    load_full_state_dict(model, full)
    back = full_state_dict(model)
    assert back.keys() == full.keys()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p, full[name].to(torch.float64)), name
        assert torch.equal(back[name], p) and back[name].data_ptr() != p.data_ptr(), name


def test_every_problem_is_named_before_anything_is_loaded():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = _full(model)
    del full["mlp.linear_fc2.bias"]
    full["extra"] = torch.zeros(1)
    full["mlp.linear_fc1.weight"] = torch.zeros(5, 4)
    with pytest.raises(ValueError) as e:
        load_full_state_dict(model, full, "checkpoint /x")
    assert str(e.value).splitlines() == [
        "checkpoint /x does not match the model:",
        "  missing tensors: ['mlp.linear_fc2.bias'] (1 in all)",
        "  unexpected tensors: ['extra'] (1 in all)",
        "  shape mismatch for 'mlp.linear_fc1.weight': checkpoint (5, 4), model (6, 4)"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    check_state_dict(model, _full(model), "checkpoint")  # a matching one passes


def test_gather_grads_is_the_grads_at_tp1():
    model = _model()
    y, _ = model["mlp"](torch.randn(3, 1, 4, dtype=torch.float64))
    y.sum().backward()
    grads = gather_grads(model)
    assert set(grads) == {n for n, p in model.named_parameters() if n.startswith("mlp.")}  # `out` has no grad
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.equal(grads[name], p.grad), name
