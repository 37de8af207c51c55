"""checkpoint/io.py: checkpoint files cannot run code, and the sharded format round-trips in one process (no process
group)."""

import os
import pickle

import pytest
import torch

from megatron_rcm.checkpoint import io
from megatron_rcm.parallel import destroy_parallel


class _Payload:
    """Unpickling this writes a marker file: what a malicious `.metadata` would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "model")
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.bfloat16)}
    io.save_full(sd, path, {"model": "wan", "config": {}})
    return path, sd


def test_full_round_trip_without_a_process_group(model_dir):
    path, sd = model_dir
    destroy_parallel()  # an earlier test of the session may have left its one-process group
    assert not torch.distributed.is_initialized()
    assert io.tensor_shapes(path) == {"a.weight": (3, 4), "b": (6,)}
    loaded = io.load_full(path)
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert loaded[k].dtype == sd[k].dtype and torch.equal(loaded[k], sd[k])
    assert torch.equal(io.load_full(path, prefix="a.")["weight"], sd["a.weight"])


def _poison(src: str, dst: str, marker: str) -> None:
    """A copy of checkpoint `src` whose `.metadata` unpickles a payload next to the real index."""
    import shutil

    shutil.copytree(src, dst)
    meta = os.path.join(dst, io.METADATA)
    with open(meta, "rb") as f:
        index = pickle.load(f)
    with open(meta, "wb") as f:
        pickle.dump((_Payload(marker), index), f)


@pytest.mark.parametrize("reader", [io.tensor_shapes, io.load_full, io.read_metadata])
def test_a_pickle_payload_is_refused_naming_the_file(model_dir, tmp_path, reader):
    path, _ = model_dir
    bad, marker = str(tmp_path / "bad"), str(tmp_path / "marker")
    _poison(path, bad, marker)
    with pytest.raises(io.UnsafeCheckpointError, match=r"bad/\.metadata: refusing to load _io\.open"):
        reader(bad)
    assert not os.path.exists(marker)


def test_the_payload_is_real(model_dir, tmp_path):
    """The poisoned index does run code when unpickled plainly (as torch's FileSystemReader would)."""
    path, _ = model_dir
    bad, marker = str(tmp_path / "bad"), str(tmp_path / "marker")
    _poison(path, bad, marker)
    with open(os.path.join(bad, io.METADATA), "rb") as f:
        pickle.load(f)
    assert os.path.exists(marker)


def test_a_truncated_index_is_named(model_dir, tmp_path):
    import shutil

    path, _ = model_dir
    bad = str(tmp_path / "cut")
    shutil.copytree(path, bad)
    meta = os.path.join(bad, io.METADATA)
    size = os.path.getsize(meta)
    with open(meta, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=r"cut/\.metadata: damaged"):
        io.load_full(bad)


def test_a_truncated_shard_is_named(model_dir, tmp_path):
    import shutil

    path, _ = model_dir
    bad = str(tmp_path / "cut")
    shutil.copytree(path, bad)
    shard = next(f for f in os.listdir(bad) if f.endswith(".distcp"))
    with open(os.path.join(bad, shard), "r+b") as f:
        f.truncate(16)
    with pytest.raises(ValueError, match=rf"cut/{shard}: truncated \(16 of \d+ bytes\)"):
        io.load_full(bad)
    os.remove(os.path.join(bad, shard))
    with pytest.raises(FileNotFoundError, match=rf"cut/{shard}: missing"):
        io.load_full(bad)
