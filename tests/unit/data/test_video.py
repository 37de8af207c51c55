"""DALI video loader on the CPU, on lossless VP9 clips made with PyAV (real DALI, no mocks)."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("nvidia.dali")

from megatron_rcm.data import NoUsableVideos, video_loader  # noqa: E402
from megatron_rcm.data.testing import corrupt_payload, decode_video, smooth_frames, write_video  # noqa: E402

NUM_VIDEOS, NUM_FRAMES, H, W = 6, 12, 24, 32


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    records = []
    for i in range(NUM_VIDEOS):
        write_video(str(root / f"v{i}.webm"), smooth_frames(NUM_FRAMES, H, W, seed=i))
        records.append({"path": f"v{i}.webm", "caption": f"caption {i}"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, manifest


def to_uint8_frames(clip: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] in [0, 255]."""
    return ((clip.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).round().clip(0, 255)


def test_frames_match_pyav(clips):
    root, manifest = clips
    loader = video_loader(manifest, frames=4, stride=2, height=H, width=W, batch_size=2, device="cpu", shuffle=False)
    assert loader.num_skipped == 0
    seen = set()
    for _ in range(len(loader)):
        batch = next(loader)
        assert batch["video"].shape == (2, 3, 4, H, W) and batch["video"].dtype == torch.float32
        assert batch["video"].min() >= -1.0 and batch["video"].max() <= 1.0
        for clip, idx, start, caption in zip(batch["video"], batch["index"], batch["first_frame"], batch["caption"]):
            idx, start = int(idx), int(start)
            assert caption == f"caption {idx}"
            reference = decode_video(str(root / f"v{idx}.webm"))[start : start + 8 : 2]
            assert psnr(to_uint8_frames(clip), reference) >= 35.0
            seen.add(idx)
    assert seen == set(range(NUM_VIDEOS))


def test_resize_and_centre_crop(clips):
    root, manifest = clips
    # 24x32 covers 12x12 at 12x16: resize by 1/2, then crop 2 columns from each side.
    loader = video_loader(manifest, frames=2, stride=1, height=12, width=12, batch_size=1, device="cpu", shuffle=False)
    batch = next(loader)
    assert batch["video"].shape == (1, 3, 2, 12, 12)
    idx, start = int(batch["index"][0]), int(batch["first_frame"][0])
    frames = torch.from_numpy(decode_video(str(root / f"v{idx}.webm"))[start : start + 2]).permute(0, 3, 1, 2)
    reference = F.interpolate(frames.double(), size=(12, 16), mode="bilinear", antialias=True)[..., 2:14]
    got = to_uint8_frames(batch["video"][0])
    assert psnr(got, reference.permute(0, 2, 3, 1).numpy()) >= 30.0


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_dp_ranks_disjoint_and_cover(clips, shuffle):
    _, manifest = clips
    # 12 frames, clips of 2 frames at stride 2, starts every 4 frames -> 3 clips per video.
    everything = {(i, s) for i in range(NUM_VIDEOS) for s in (0, 4, 8)}
    per_rank = []
    for rank in range(2):
        loader = video_loader(
            manifest, frames=2, stride=2, height=8, width=8, batch_size=1, dp_rank=rank, dp_size=2, seed=3,
            device="cpu", shuffle=shuffle,
        )
        got = [(int(b["index"][0]), int(b["first_frame"][0])) for b in (next(loader) for _ in range(len(loader)))]
        assert len(got) == len(set(got)) == loader.samples_per_epoch  # one epoch: each clip once
        per_rank.append(set(got))
    assert per_rank[0] and per_rank[1]
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == everything
    # Whole videos go to one rank, so TP/CP/PP splits never see half a video on another rank.
    assert not {i for i, _ in per_rank[0]} & {i for i, _ in per_rank[1]}


def test_resume_gives_the_same_batches(clips, tmp_path):
    _, manifest = clips
    kwargs = dict(frames=2, stride=1, height=16, width=16, batch_size=2, seed=7, device="cpu", step=3)
    uninterrupted = video_loader(manifest, **kwargs)
    k, more = 5, 6  # the epoch has 6 * 4 = 24 clips = 12 batches; resume inside it
    for _ in range(k):
        next(uninterrupted)
    torch.save(uninterrupted.state_dict(), tmp_path / "loader.pt")
    expected = [next(uninterrupted) for _ in range(more)]

    resumed = video_loader(manifest, **kwargs)
    resumed.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=False))
    for want in expected:
        got = next(resumed)
        assert got["caption"] == want["caption"]
        assert torch.equal(got["index"], want["index"]) and torch.equal(got["first_frame"], want["first_frame"])
        assert torch.equal(got["video"], want["video"])
    # A fresh loader (not resumed) gives a different continuation: the check above is not vacuous.
    fresh = video_loader(manifest, **kwargs)
    assert not all(torch.equal(next(fresh)["index"], w["index"]) for w in expected)


def test_resume_refuses_a_different_loader(clips):
    _, manifest = clips
    state = video_loader(manifest, frames=2, stride=1, height=8, width=8, batch_size=1, device="cpu").state_dict()
    other = video_loader(manifest, frames=2, stride=1, height=8, width=8, batch_size=2, device="cpu")
    with pytest.raises(ValueError, match="different loader"):
        other.load_state_dict(state)


def test_bad_files_are_skipped_and_counted(clips, tmp_path):
    root, _ = clips
    write_video(str(tmp_path / "short.webm"), smooth_frames(3, H, W))  # fewer frames than one clip
    (tmp_path / "junk.webm").write_bytes(b"not a video at all" * 10)
    corrupt_payload(str(root / "v1.webm"), str(tmp_path / "late.webm"))  # header fine, decoding fails
    records = [
        {"path": str(root / "v0.webm"), "caption": "good 0"},
        {"path": "short.webm", "caption": "short"},
        {"path": "junk.webm", "caption": "junk"},
        {"path": "missing.webm", "caption": "missing"},
        {"path": "late.webm", "caption": "late"},
        {"path": str(root / "v2.webm"), "caption": "good 2"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    loader = video_loader(manifest, frames=4, stride=2, height=8, width=8, batch_size=2, device="cpu")
    # The probe catches three before the pipeline is built; the late one passes it.
    assert loader.num_skipped == 3
    assert {os.path.basename(p) for p, _ in loader.skipped} == {"short.webm", "junk.webm", "missing.webm"}
    captions = [c for _ in range(6) for c in next(loader)["caption"]]
    assert set(captions) == {"good 0", "good 2"}
    assert loader.num_skipped == 4 and os.path.basename(loader.skipped[-1][0]) == "late.webm"
    assert "late.webm" in json.dumps(loader.state_dict()["skipped"])


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        video_loader(tmp_path / "nope.jsonl", frames=2, stride=1, height=8, width=8, batch_size=1, device="cpu")


def test_missing_caption_is_a_clear_error(clips, tmp_path):
    root, _ = clips
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": str(root / "v0.webm")}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:1: no caption"):
        video_loader(manifest, frames=2, stride=1, height=8, width=8, batch_size=1, device="cpu")
    manifest.write_text(json.dumps({"path": str(root / "v0.webm"), "caption_path": "gone.txt"}) + "\n")
    with pytest.raises(FileNotFoundError, match="caption file not found"):
        video_loader(manifest, frames=2, stride=1, height=8, width=8, batch_size=1, device="cpu")


def test_cpu_skips_h264_with_the_reason(clips, tmp_path):
    root, _ = clips
    write_video(str(tmp_path / "clip.mp4"), smooth_frames(12, H, W), codec="libx264", pix_fmt="yuv420p")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "clip.mp4", "caption": "h264"}) + "\n"
                        + json.dumps({"path": str(root / "v0.webm"), "caption": "vp9"}) + "\n")
    loader = video_loader(manifest, frames=2, stride=1, height=8, width=8, batch_size=1, device="cpu")
    assert loader.num_skipped == 1 and "codec 'h264' not decodable here" in loader.skipped[0][1]
    assert next(loader)["caption"] == ["vp9"]
    manifest.write_text(json.dumps({"path": "clip.mp4", "caption": "h264"}) + "\n")
    with pytest.raises(NoUsableVideos, match="no usable videos for dp rank 0"):
        video_loader(manifest, frames=2, stride=1, height=8, width=8, batch_size=1, device="cpu")
