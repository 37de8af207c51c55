"""Cheap checks of video files with PyAV before a DALI pipeline sees them.

A DALI video reader indexes every file when the pipeline is built and aborts the whole pipeline
("pipeline object is no longer valid") on a file it cannot index, while it silently drops files that
are too short. Both would break the loader's bookkeeping, so every file is checked first and the bad
ones are skipped and counted instead.
"""

import os
from dataclasses import dataclass

# What DALI's video reader decodes on each backend (its documentation, DALI 2.x).
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = CPU_CODECS | frozenset({"h264", "hevc", "av1", "mpeg4"})


@dataclass(frozen=True)
class VideoCheck:
    """The outcome of checking one file."""

    ok: bool
    reason: str = ""
    """Why the file is unusable (empty when ``ok``)."""

    num_frames: int = 0
    codec: str = ""
    height: int = 0
    width: int = 0


def required_frames(frames: int, stride: int) -> int:
    """Frames a file needs for one clip of ``frames`` frames ``stride`` apart.

    DALI's reader asks for ``frames * stride`` (not ``(frames - 1) * stride + 1``) and silently drops
    shorter files, so the check uses the same bound.
    """
    return frames * stride


def check_video(
    path: str,
    *,
    min_frames: int,
    codecs: frozenset[str] = CPU_CODECS,
    num_frames: int | None = None,
    full_decode: bool = False,
) -> VideoCheck:
    """Check that ``path`` is a readable video with a supported codec and at least ``min_frames`` frames.

    Args:
        path: the video file.
        min_frames: the fewest frames a usable file has.
        codecs: codec names (FFmpeg's) the decoder supports.
        num_frames: the frame count from the manifest; when given the file is not scanned for its length.
        full_decode: decode every frame (slow; finds corruption in the middle of a stream). Otherwise only
            the container header is parsed, the packets are counted and the first frame is decoded.
    """
    import av  # PyAV: a core dependency, imported here so that the module imports fast

    if not os.path.isfile(path):
        return VideoCheck(False, "file not found")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return VideoCheck(False, "no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            height, width = stream.codec_context.height, stream.codec_context.width
            if codec not in codecs:
                return VideoCheck(False, f"codec {codec!r} not decodable here (supported: {sorted(codecs)})")
            if full_decode:
                count = sum(1 for _ in container.decode(stream))
            else:
                next(container.decode(stream))  # raises StopIteration when nothing decodes
                container.seek(0)
                if num_frames is not None:
                    count = num_frames
                elif stream.frames and stream.frames > 0:
                    count = stream.frames
                else:  # WebM/MKV headers carry no frame count: count the packets (no decoding)
                    count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except StopIteration:
        return VideoCheck(False, "no decodable frame")
    except Exception as e:  # noqa: BLE001 - any PyAV/FFmpeg error means the file is unusable
        return VideoCheck(False, f"unreadable: {type(e).__name__}: {e}")
    if count < min_frames:
        return VideoCheck(False, f"too short: {count} frames < {min_frames}", count, codec, height, width)
    return VideoCheck(True, "", count, codec, height, width)
