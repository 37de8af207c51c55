"""Console lines in Megatron's style and TensorBoard scalars / sample videos (rank 0 writes)."""

import io
import json
import os
import sys
import time

import numpy as np

METRICS_FILE = "metrics.jsonl"
"""One JSON line per iteration in the run directory (exact float repr): what tests and scripts compare across runs."""


def append_metrics(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, METRICS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str) -> dict[int, dict]:
    """The last record of every iteration (a resumed run re-logs the iterations after its checkpoint)."""
    out = {}
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        for line in f:
            r = json.loads(line)
            out[r["iteration"]] = r
    return out


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainingLogger:
    """Collects per-iteration numbers and prints/writes them every `log_interval` iterations."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, train_iters: int, log_interval: int):
        self.enabled, self.train_iters, self.log_interval = enabled, train_iters, log_interval
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self.start_time = time.time()
        self.start_iteration = None
        self.window: list[dict] = []
        self.window_start = time.time()

    def print(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}", flush=True)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image (e.g. `evaluation.labeled_grid`) as a TensorBoard image summary."""
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def video(self, tag: str, frames: np.ndarray, step: int, fps: int = 4) -> None:
        """An animated GIF summary of `[T, H, W, 3]` uint8 frames (what TensorBoard shows as a video)."""
        if self.writer is None:
            return
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        images = [Image.fromarray(f) for f in frames]
        buf = io.BytesIO()
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        t, h, w, c = frames.shape
        summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
            height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue()))])
        self.writer._get_file_writer().add_summary(summary, step)

    def start(self, it: int) -> None:
        """Call before the first iteration `it` (0-based) of this process."""
        self.start_iteration = it
        self.start_time = self.window_start = time.time()

    def iteration(self, it: int, record: dict, samples: int) -> None:
        """`record`: phase, losses, grad norm, lr, nan counts, skipped flag of iteration `it` (0-based)."""
        record = {**record, "samples": samples}
        self.window.append(record)
        step = it + 1
        for k, v in record.items():
            if k in ("phase", "samples") or v is None:
                continue
            self.scalar(k, float(v), step)
        if step % self.log_interval != 0 and step != self.train_iters:
            return
        now = time.time()
        dt = now - self.window_start
        n = len(self.window)
        done = step - self.start_iteration
        per_iter = (now - self.start_time) / max(done, 1)
        parts = [f"iteration {step:8d}/{self.train_iters:8d}",
                 f"phase {'/'.join(sorted({r['phase'] for r in self.window}))}",
                 f"elapsed time per iteration (ms): {1000 * dt / n:.1f}",
                 f"samples/s: {sum(r['samples'] for r in self.window) / max(dt, 1e-9):.1f}"]
        keys = sorted({k for r in self.window for k in r} - {"phase", "samples"})
        for k in keys:
            vals = [r[k] for r in self.window if r.get(k) is not None]
            if not vals:
                continue
            if k.startswith("skipped") or k.startswith("nan_grads"):
                parts.append(f"{k}: {int(sum(vals))}")
            elif k.startswith("lr"):
                parts.append(f"{k}: {vals[-1]:.3E}")
            else:
                parts.append(f"{k}: {np.mean(vals):.4E}")
        parts.append(f"elapsed: {_hms(now - self.start_time)}")
        parts.append(f"ETA: {_hms(per_iter * (self.train_iters - step))}")
        self.scalar("throughput/samples_per_s", sum(r["samples"] for r in self.window) / max(dt, 1e-9), step)
        self.print(" | ".join(parts))
        self.window, self.window_start = [], now

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        sys.stdout.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
