"""The preprocessed set of the data and preprocessing tests: tiny random VAE / UMT5, five smooth clips and one junk
file (manifest row 2), and `run`: `preprocess()` over it."""

import json

import torch

from megatron_rcm.data.preprocess import PreprocessConfig, preprocess
from megatron_rcm.data.testing import TINY_SENTENCES, save_tiny_text_encoder, save_tiny_vae, smooth_frames, write_video
from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder, WanVAE

FRAMES, H, W = 5, 16, 16  # latent [16, 2, 2, 2]


def make_data(root):
    """Write the set under `root` (a pathlib.Path) and return `root`."""
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
