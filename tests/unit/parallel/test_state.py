"""parallel/state.py in one process: without torchrun's variables a one-process world (gloo on the CPU) with every
parallel size 1; sizes that the world cannot hold are refused; seeding repeats every generator's draws. The
multi-process layouts are in tests/distributed."""

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_rcm.parallel import state


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_one_process_world(no_torchrun):
    state.destroy_parallel()
    assert not dist.is_initialized()
    state.ensure_parallel()
    assert dist.is_initialized() and dist.get_world_size() == 1
    if not torch.cuda.is_available():
        assert state.default_backend() == dist.get_backend() == "gloo"
    sizes = [state.tp_size(), state.cp_size(), state.pp_size(), state.dp_size()]
    ranks = [state.tp_rank(), state.cp_rank(), state.pp_rank(), state.dp_rank()]
    assert sizes == [1, 1, 1, 1] and ranks == [0, 0, 0, 0]
    assert all(g.size() == 1 for g in (state.tp_group(), state.cp_group(), state.pp_group(), state.dp_group()))
    state.destroy_parallel()
    assert not dist.is_initialized()


def test_sizes_the_world_cannot_hold_are_refused(no_torchrun):
    with pytest.raises(ValueError, match="tensor_model_parallel_size must be a positive integer, got 0"):
        state.initialize_parallel(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tensor \(2\) x context \(1\) x pipeline "
                                         r"\(1\) parallel sizes = 2"):
        state.initialize_parallel(tensor_model_parallel_size=2)


def test_seeding_repeats_python_numpy_and_torch():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    state.set_random_seed(7)
    first = draws()
    state.set_random_seed(7)
    assert draws() == first
    state.set_random_seed(8)
    assert draws() != first
