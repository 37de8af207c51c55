"""data/preprocess.py: videos into latent shards with tiny random VAE / UMT5, checked against encoding the decoded
frames directly; a rerun rewrites nothing and a crashed run redoes only its missing shards."""

import json
import os

import pytest
import torch

pytest.importorskip("nvidia.dali")

from _preprocessed import FRAMES, encoders, make_data, run  # noqa: E402

from megatron_rcm.data import latent_loader  # noqa: E402
from megatron_rcm.data.shards import shard_name  # noqa: E402
from megatron_rcm.data.testing import decode_video  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pre"))


def test_preprocess_then_read_back(data, tmp_path):
    out = tmp_path / "shards"
    # Two "ranks" one after the other, as torchrun would run them side by side.
    counts = [run(data, out, rank=r, world=2) for r in range(2)]
    assert [c["written"] for c in counts] == [2, 1]  # shards 0, 2 and shard 1
    assert sum(c["samples"] for c in counts) == 5 and sum(c["skipped"] for c in counts) == 1
    assert sorted(os.listdir(out)) == [
        "meta.json", "shard-000000.idx.json", "shard-000000.tar", "shard-000001.idx.json", "shard-000001.tar",
        "shard-000002.idx.json", "shard-000002.tar", "skipped-rank00001.jsonl",
    ]
    skipped = [json.loads(line) for line in open(out / "skipped-rank00001.jsonl")]
    assert [os.path.basename(s["path"]) for s in skipped] == ["junk.webm"] and skipped[0]["shard"] == 1

    # Independent reference: decode with PyAV, encode directly with the same tiny models.
    vae, text = encoders(data)
    loader = latent_loader(out, batch_size=5, shuffle=False)
    batch = next(loader)
    assert batch["latent"].shape == (5, 16, 2, 2, 2)
    assert batch["text_embedding"].shape == (5, 16, 32)
    manifest = [json.loads(line) for line in open(data / "manifest.jsonl")]
    assert batch["key"] == ["000000000", "000000001", "000000003", "000000004", "000000005"]
    for i, key in enumerate(batch["key"]):
        record = manifest[int(key)]
        frames = torch.from_numpy(decode_video(str(data / record["path"]))[:FRAMES])
        video = (frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0)[None]
        torch.testing.assert_close(batch["latent"][i], vae.encode(video)[0], rtol=1e-4, atol=1e-4)
        expected = text([record["caption"]])[0]
        torch.testing.assert_close(batch["text_embedding"][i], expected)
        assert batch["text_length"][i] == len(record["caption"].split()) + 1
        assert batch["caption"][i] == record["caption"]

    # Re-running finds every shard done and rewrites nothing.
    mtimes = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    assert run(data, out)["existing"] == 3
    assert mtimes == {f: os.path.getmtime(out / f) for f in os.listdir(out)}


def test_resume_after_a_crash_redoes_only_missing_shards(data, tmp_path):
    out = tmp_path / "shards"
    run(data, out)
    before = (out / shard_name(0)).read_bytes()
    os.remove(out / shard_name(1))  # as if the run died while writing shard 1 ...
    (out / (shard_name(1) + ".tmp")).write_bytes(b"partial")  # ... leaving its temporary file
    counts = run(data, out)
    assert counts == {"written": 1, "existing": 2, "samples": 1, "skipped": 1}
    assert (out / shard_name(0)).read_bytes() == before
    assert next(latent_loader(out, batch_size=5, shuffle=False))["latent"].shape == (5, 16, 2, 2, 2)
