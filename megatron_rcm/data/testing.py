"""Small video files made offline with PyAV, for tests and benchmarks."""

import numpy as np


def smooth_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 frames of moving low-frequency colour waves (distinct per seed).

    Smooth content keeps the comparison of two decoders about their YUV->RGB conversion rather than
    about how they upsample sharp chroma edges.
    """
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for i in range(num_frames):
        phase = 0.3 * i + 0.37 * seed
        img = np.stack(
            [
                np.sin(2 * np.pi * (1.5 * xx + phase)),
                np.cos(2 * np.pi * (1.2 * yy - phase)),
                np.sin(2 * np.pi * (xx + yy + 0.5 * phase + 0.1 * seed)),
            ],
            axis=-1,
        )
        frames.append((127.5 + 100.0 * img).astype(np.uint8))
    return np.stack(frames)


def write_video(
    path: str,
    frames: np.ndarray,
    *,
    codec: str = "libvpx-vp9",
    fps: int = 8,
    lossless: bool = True,
    pix_fmt: str = "yuv444p",
) -> None:
    """Encode ``[F, H, W, 3]`` uint8 RGB frames into ``path`` (container from the extension).

    The default, lossless VP9 in 4:4:4, decodes back to exactly the YUV the encoder was given.
    """
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = pix_fmt
        if lossless and codec == "libvpx-vp9":
            stream.options = {"lossless": "1"}
        elif codec in ("libx264", "h264"):
            stream.options = {"crf": "0" if lossless else "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_video(path: str) -> np.ndarray:
    """All frames of ``path`` as ``[F, H, W, 3]`` uint8 RGB, decoded by PyAV (FFmpeg)."""
    import av

    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def corrupt_payload(src: str, dst: str, first_packet: int = 1) -> None:
    """Copy ``src`` to ``dst`` scrambling the payload of its packets from ``first_packet`` on.

    The container stays intact and the first frames still decode, so a header probe passes the file
    while decoding it fails part-way: the kind of file that only shows up inside the pipeline.
    """
    import av

    data = bytearray(open(src, "rb").read())
    with av.open(src) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    for pos, size in packets[first_packet:]:
        for i in range(pos + 8, pos + size - 8):
            data[i] = (data[i] * 77 + 13) % 256
    with open(dst, "wb") as f:
        f.write(bytes(data))
