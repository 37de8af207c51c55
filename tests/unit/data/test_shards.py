"""Preprocessing into latent shards with tiny random VAE / UMT5, and reading the shards back."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("nvidia.dali")

from megatron_rcm.data import latent_loader  # noqa: E402
from megatron_rcm.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_rcm.data.shards import read_index, read_sample, shard_name, write_shard  # noqa: E402
from megatron_rcm.data.testing import (  # noqa: E402
    TINY_SENTENCES,
    decode_video,
    save_tiny_text_encoder,
    save_tiny_vae,
    smooth_frames,
    write_video,
)
from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder, WanVAE  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
FRAMES, H, W = 5, 16, 16  # latent [16, 2, 2, 2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    save_tiny_vae(str(root / "wan"))
    save_tiny_text_encoder(str(root / "wan"))
    records = []
    for i in range(5):
        write_video(str(root / f"v{i}.webm"), smooth_frames(8, H, W, seed=i))
        records.append({"path": f"v{i}.webm", "caption": TINY_SENTENCES[i % 4]})
    (root / "junk.webm").write_bytes(b"\x00" * 100)
    records.insert(2, {"path": "junk.webm", "caption": "junk"})  # manifest row 2
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def encoders(root):
    vae = WanVAE.from_pretrained(root / "wan")
    text = UMT5TextEncoder.from_pretrained(root / "wan", dtype=torch.float32, config=TextEncoderConfig(max_length=16))
    return vae, text


def run(root, out, rank=0, world=1):
    config = PreprocessConfig(
        manifest=str(root / "manifest.jsonl"), output=str(out), frames=FRAMES, stride=1, height=H, width=W,
        samples_per_shard=2, batch_size=2, latent_dtype="float32", rank=rank, world_size=world, progress=False,
    )
    return preprocess(config, *encoders(root), device="cpu")


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


def test_preprocess_help_explains():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for words in ("--manifest", "torchrun", "resume", "skipped-rank", "480p = 832x480"):
        assert words in out


def test_preprocess_cli_under_torchrun(data, tmp_path):
    """Two concurrent ranks started by torchrun write disjoint shards into one folder."""
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(REPO, "tools", "preprocess_data.py"), "--manifest", str(data / "manifest.jsonl"),
           "--model", str(data / "wan"), "--output", str(out), "--frames", str(FRAMES), "--height", str(H),
           "--width", str(W), "--samples-per-shard", "2", "--dtype", "float32", "--latent-dtype", "float32",
           "--max-text-length", "16", "--device", "cpu", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2: {'written': 2, 'existing': 0, 'samples': 4, 'skipped': 0}" in result.stderr
    assert "rank 1/2: {'written': 1, 'existing': 0, 'samples': 1, 'skipped': 1}" in result.stderr
    batch = next(latent_loader(out, batch_size=5, shuffle=False))
    assert batch["key"] == ["000000000", "000000001", "000000003", "000000004", "000000005"]
    # The same values as the in-process run (the CLI loads the same tiny models from the same folder).
    reference = tmp_path / "reference"
    run(data, reference)
    torch.testing.assert_close(batch["latent"], next(latent_loader(reference, batch_size=5, shuffle=False))["latent"])
