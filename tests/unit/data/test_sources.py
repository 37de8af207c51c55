"""build_data_loader: the same batch from online encoding of videos and from precomputed shards."""

import json

import pytest
import torch

pytest.importorskip("nvidia.dali")

from megatron_rcm.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_rcm.data.sources import DataConfig, build_data_loader  # noqa: E402
from megatron_rcm.data.testing import (  # noqa: E402
    TINY_SENTENCES,
    save_tiny_text_encoder,
    save_tiny_vae,
    smooth_frames,
    write_video,
)
from megatron_rcm.models.encoders import UMT5TextEncoder, WanVAE  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    save_tiny_vae(str(root / "wan"))
    save_tiny_text_encoder(str(root / "wan"))
    records = []
    for i in range(4):
        write_video(str(root / f"v{i}.webm"), smooth_frames(5, 16, 16, seed=i))
        records.append({"path": f"v{i}.webm", "caption": TINY_SENTENCES[i]})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_online_and_precomputed_sources_agree(data, tmp_path):
    common = dict(frames=5, stride=1, height=16, width=16, encoder_dtype="float32")
    online = build_data_loader(DataConfig(source="videos", path=str(data / "manifest.jsonl"), model=str(data / "wan"),
                                          **common), batch_size=2, seed=3, device="cpu")
    batch = next(online)
    assert batch["latent"].shape == (2, 16, 2, 2, 2) and batch["text_embedding"].shape == (2, 512, 32)

    # Reference: the same clips encoded directly.
    vae, text = WanVAE.from_pretrained(data / "wan"), UMT5TextEncoder.from_pretrained(data / "wan", dtype=torch.float32)
    videos = online.videos
    state = online.state_dict()
    raw = next(videos)
    online.load_state_dict(state)
    again = next(online)
    torch.testing.assert_close(again["latent"], vae.encode(raw["video"]))
    torch.testing.assert_close(again["text_embedding"], text(raw["caption"]))
    assert again["caption"] == raw["caption"]

    # The precomputed shards of the same videos give the same latents for the same captions.
    preprocess(PreprocessConfig(manifest=str(data / "manifest.jsonl"), output=str(tmp_path / "shards"), frames=5,
                                height=16, width=16, samples_per_shard=4, latent_dtype="float32", progress=False),
               vae, text, device="cpu")
    shards = build_data_loader(DataConfig(source="latents", path=str(tmp_path / "shards")), batch_size=4)
    stored = next(shards)
    assert set(stored) >= {"latent", "text_embedding", "text_length", "caption"}
    by_caption = dict(zip(stored["caption"], stored["latent"]))
    for caption, latent in zip(again["caption"], again["latent"]):
        torch.testing.assert_close(by_caption[caption], latent, rtol=1e-4, atol=1e-4)


def test_bad_data_config_is_a_clear_error(data):
    with pytest.raises(ValueError, match="unknown source"):
        build_data_loader(DataConfig(source="webvid", path="x"))
    with pytest.raises(FileNotFoundError, match="local Wan folder"):
        build_data_loader(DataConfig(source="videos", path=str(data / "manifest.jsonl"), model="nope"))
