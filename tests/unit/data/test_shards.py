"""data/shards.py: preprocessed shards read back per data-parallel rank, resumed mid-epoch, and a shard of the wrong
shape named (the shards come from data/preprocess.py, tested in test_preprocess.py)."""

import pytest
import torch

pytest.importorskip("nvidia.dali")

from _preprocessed import make_data, run  # noqa: E402

from megatron_rcm.data import latent_loader  # noqa: E402
from megatron_rcm.data.shards import read_index, read_sample, shard_name, write_shard  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pre"))


def test_latent_loader_ranks_and_resume(data, tmp_path):
    out = tmp_path / "shards"
    run(data, out)
    keys = [set(), set()]
    for r in range(2):
        loader = latent_loader(out, batch_size=1, dp_rank=r, dp_size=2, seed=4)
        assert len(loader) == 2  # 5 samples over 2 ranks: 2 each, the same count on every rank
        keys[r] = {next(loader)["key"][0] for _ in range(len(loader))}
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 4

    a = latent_loader(out, batch_size=2, seed=1)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(4)]  # crosses an epoch boundary
    b = latent_loader(out, batch_size=2, seed=1)
    b.load_state_dict(state)
    for want in expected:
        got = next(b)
        assert got["key"] == want["key"] and torch.equal(got["latent"], want["latent"])


def test_wrong_shape_shard_names_the_shard(data, tmp_path):
    out = tmp_path / "shards"
    run(data, out)
    path = str(out / shard_name(1))
    samples = []
    for entry in read_index(path):
        tensors, info = read_sample(path, entry)
        samples.append({"key": entry["key"], "latent": tensors["latent"][:, :1], "text_embedding":
                        tensors["text_embedding"], "info": info})
    write_shard(path, samples)  # shard 1 now holds latents of [16, 1, 2, 2]
    loader = latent_loader(out, batch_size=5, shuffle=False)
    with pytest.raises(ValueError, match=r"shard-000001\.tar: sample '000000003' has latent of shape \[16, 1, 2, 2\], "
                       r"expected \[16x2x2x2\]"):
        next(loader)
