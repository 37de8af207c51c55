"""training/checkpointing.py: the `latest` pointer, retention, side directories, JSON state, the run lock and the
old-format refusal."""

import os

import pytest
import torch

from megatron_rcm.training import checkpointing


def _run_dir(tmp_path, iterations, latest):
    root = tmp_path / "checkpoints"
    for i in iterations:
        (root / f"iter_{i:07d}").mkdir(parents=True)
        (root / f"iter_{i:07d}" / "meta.json").write_text("{}")
    (root / "iter_0000099.incomplete-1234abcd").mkdir()
    if latest is not None:
        (root / "latest").write_text(latest + "\n")
    return str(root)


def test_keep_last_keeps_what_latest_names_and_everything_newer(tmp_path):
    root = _run_dir(tmp_path, [2, 4, 6, 8], latest="iter_0000004")
    assert checkpointing.prune(root, keep_last=1) == ["iter_0000002"]
    assert checkpointing.complete_checkpoints(root) == ["iter_0000004", "iter_0000006", "iter_0000008"]


def test_keep_last_counts_back_from_latest(tmp_path):
    root = _run_dir(tmp_path, [2, 4, 6, 8], latest="iter_0000008")
    assert checkpointing.prune(root, keep_last=2) == ["iter_0000002", "iter_0000004"]
    assert checkpointing.prune(root, keep_last=0) == []


def test_without_latest_nothing_is_pruned(tmp_path):
    root = _run_dir(tmp_path, [2, 4], latest=None)
    assert checkpointing.prune(root, keep_last=1) == []
    assert checkpointing.complete_checkpoints(root) == ["iter_0000002", "iter_0000004"]


@pytest.mark.parametrize("pointer", ["../iter_0000004", "/abs/iter_0000004", "iter_0000004/..", "tensors"])
def test_latest_must_name_a_sibling_checkpoint(tmp_path, pointer):
    root = _run_dir(tmp_path, [4], latest=pointer)
    with pytest.raises(checkpointing.CheckpointError, match="not the name of a sibling iter_NNNNNNN directory"):
        checkpointing.read_pointer(root)


def test_latest_naming_an_incomplete_checkpoint_refuses(tmp_path):
    _run_dir(tmp_path, [2, 4], latest="iter_0000006")
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"latest names iter_0000006, which is not a complete checkpoint \(complete: "
                             r"iter_0000002, iter_0000004\)"):
        checkpointing.resolve(str(tmp_path))


def test_leftover_side_directories_are_removed(tmp_path):
    root = _run_dir(tmp_path, [2], latest="iter_0000002")
    checkpointing.remove_leftovers(root)
    assert sorted(os.listdir(root)) == ["iter_0000002", "latest"]


def _json_round_trip(obj):
    import json

    return checkpointing.from_json(json.loads(json.dumps(checkpointing.to_json(obj))))


def test_json_state_round_trips_exactly():
    state = {3: (1.5, None, [True, "x"]), "t": torch.randn(4, dtype=torch.float64),
             "b": torch.tensor([1, 2], dtype=torch.bfloat16), "e": torch.empty(0, 3)}
    back = _json_round_trip(state)
    assert back[3] == (1.5, None, [True, "x"])
    assert torch.equal(back["t"], state["t"]) and back["b"].dtype == torch.bfloat16
    assert torch.equal(back["b"], state["b"]) and back["e"].shape == (0, 3)


def test_rng_states_round_trip_through_json():
    import random

    import numpy as np

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    saved = _json_round_trip(checkpointing.rng_state())
    first = draws()
    checkpointing.set_rng_state(saved)
    assert draws() == first


def test_the_run_lock_names_its_holder(tmp_path):
    first = checkpointing.RunLock(str(tmp_path))
    first.acquire()
    try:
        with pytest.raises(checkpointing.CheckpointError, match=rf"in use by another job \(host .* pid {os.getpid()};"):
            checkpointing.RunLock(str(tmp_path)).acquire()
    finally:
        first.release()
    checkpointing.RunLock(str(tmp_path)).acquire()  # free again once released


def test_an_old_format_checkpoint_is_refused_in_one_line(tmp_path):
    root = _run_dir(tmp_path, [2, 4], latest="iter_0000004")
    for i in (2, 4):
        (tmp_path / "checkpoints" / f"iter_{i:07d}" / "mp_rank_00_000_00.pt").write_bytes(b"old pickle")
    with pytest.raises(checkpointing.OldFormatError, match=r"iter_0000004 is an old-format checkpoint \(per-rank "
                                                            r"torch pickles, mp_rank_\*\.pt\)"):
        checkpointing.resolve(str(tmp_path))
    assert checkpointing.complete_checkpoints(root) == ["iter_0000002", "iter_0000004"]


def test_launch_command_is_what_one_types_again():
    """meta.json's `command` (the exported model card's "Trained with")."""
    from megatron_rcm.training.trainer import launch_command

    argv = [os.path.abspath("examples/pretrain_rcm.py"), "--config", "a b.yaml", "training.nan_iterations=[5]"]
    assert launch_command(argv, {}) == "python examples/pretrain_rcm.py --config 'a b.yaml' 'training.nan_iterations=[5]'"
    one_node = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}
    assert launch_command(argv[:1], one_node) == "torchrun --nproc_per_node=2 examples/pretrain_rcm.py"
    nodes = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "64"}
    assert launch_command(argv[:1], nodes) == "torchrun --nnodes=8 --nproc_per_node=8 examples/pretrain_rcm.py"
