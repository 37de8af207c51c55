"""data/validate.py: the PyAV probe that runs before DALI sees a file, on real files: a good clip, one too short, junk,
a missing path, a codec the CPU reader cannot decode, and one whose payload breaks after the first frames."""

import pytest

from megatron_rcm.data.testing import corrupt_payload, smooth_frames, write_video
from megatron_rcm.data.validate import CPU_CODECS, GPU_CODECS, VideoCheck, check_video, required_frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "good.webm"
    write_video(str(path), smooth_frames(12, 16, 24))
    return path


def test_dali_asks_for_frames_times_stride():
    assert required_frames(4, 2) == 8 and required_frames(81, 1) == 81


def test_a_good_clip(clip):
    want = VideoCheck(True, "", 12, "vp9", 16, 24)
    assert check_video(str(clip), min_frames=12) == want  # WebM carries no frame count: the packets are counted
    assert check_video(str(clip), min_frames=12, full_decode=True) == want
    assert check_video(str(clip), min_frames=5, num_frames=7).num_frames == 7  # the manifest's count is taken


def test_unusable_files_say_why(clip, tmp_path):
    short = check_video(str(clip), min_frames=13)
    assert not short.ok and short.reason == "too short: 12 frames < 13" and short.num_frames == 12
    assert check_video(str(tmp_path / "absent.webm"), min_frames=1) == VideoCheck(False, "file not found")
    (tmp_path / "junk.webm").write_bytes(b"not a video at all" * 10)
    junk = check_video(str(tmp_path / "junk.webm"), min_frames=1)
    assert not junk.ok and junk.reason.startswith("unreadable: ")


def test_codecs_per_backend(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(str(path), smooth_frames(4, 16, 16), codec="libx264", pix_fmt="yuv420p")
    cpu = check_video(str(path), min_frames=1)
    assert not cpu.ok and cpu.reason.startswith("codec 'h264' not decodable here")
    assert check_video(str(path), min_frames=1, codecs=GPU_CODECS).ok
    assert CPU_CODECS < GPU_CODECS


def test_a_broken_payload_passes_the_header_probe_but_not_a_full_decode(clip, tmp_path):
    late = tmp_path / "late.webm"
    corrupt_payload(str(clip), str(late))
    assert check_video(str(late), min_frames=1).ok
    broken = check_video(str(late), min_frames=12, full_decode=True)
    assert not broken.ok and broken.reason.startswith("unreadable: InvalidDataError")
