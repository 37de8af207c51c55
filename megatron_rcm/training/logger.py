"""Console lines in Megatron's style and TensorBoard scalars / sample videos (rank 0 writes)."""

import io
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

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
        self.window_start = self._last = time.time()

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
        self.start_time = self.window_start = self._last = time.time()

    def iteration(self, it: int, record: dict, samples: int, flops: float | None = None) -> None:
        """`record`: phase, losses, grad norm, lr, nan counts, skipped flag, `time/<pass>` seconds of iteration
        `it` (0-based); `samples`: the global batch; `flops`: model FLOPs of the iteration over all ranks
        (`training.flops`), None when not counted."""
        now = time.time()
        # eval time between iterations is excluded: the trainer moves `window_start` past it
        seconds = now - max(self._last, self.window_start)
        self._last = now
        record = {**record, "samples": samples, "_seconds": seconds, "_flops": flops}
        self.window.append(record)
        step = it + 1
        self.consumed_samples = getattr(self, "consumed_samples", it * samples) + samples
        for k, v in record.items():
            if k in ("phase", "samples") or k.startswith("_") or v is None:
                continue
            self.scalar(k, float(v), step)
        if step % self.log_interval != 0 and step != self.train_iters:
            return
        self.print(self.format_line(step, now))
        self.window, self.window_start = [], now

    def format_line(self, step: int, now: float) -> str:
        """One console line in Megatron-LM's labels and order, then the rCM-specific fields."""
        win, dt = self.window, max(now - self.window_start, 1e-9)
        n = len(win)
        done = step - self.start_iteration
        per_iter = (now - self.start_time) / max(done, 1)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        samples_per_s = sum(r["samples"] for r in win) / dt
        parts = [f" iteration {step:8d}/{self.train_iters:8d}",
                 f"consumed samples: {self.consumed_samples:12d}",
                 f"elapsed time per iteration (ms): {1000 * dt / n:.1f}"]
        flops = [r["_flops"] for r in win if r["_flops"] is not None]
        if len(flops) == n:
            tflops = sum(flops) / dt / world / 1e12
            # Megatron-LM's one decimal, or enough digits to be non-zero for the tiny CPU models
            parts.append(f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}" if tflops >= 1 else
                         f"throughput per GPU (TFLOP/s/GPU): {tflops:.2e}")
            self.scalar("throughput/tflops_per_gpu", tflops, step)
        parts.append(f"samples/s: {samples_per_s:.1f}")
        self.scalar("throughput/samples_per_s", samples_per_s, step)
        for phase in sorted({r["phase"] for r in win}):
            ms = [1000 * r["_seconds"] for r in win if r["phase"] == phase]
            parts.append(f"{phase} step (ms): {np.mean(ms):.1f}")
        keys = sorted({k for r in win for k in r} - {"phase", "samples", "_seconds", "_flops"})

        def values(k):
            return [r[k] for r in win if r.get(k) is not None]

        def group(prefix, label, fmt):
            items = [(k[len(prefix):], values(k)) for k in keys if k.startswith(prefix)]
            items = [(name, fmt(v)) for name, v in items if v]
            if items:
                parts.append(f"{label}: " + " ".join(f"{name} {v}" for name, v in items))

        group("lr/", "learning rate", lambda v: f"{v[-1]:.3E}")
        group("loss/", "loss", lambda v: f"{np.mean(v):.4E}")
        group("grad_norm/", "grad norm", lambda v: f"{np.mean(v):.4E}")
        parts.append(f"number of skipped iterations: {int(sum(values('skipped_iterations')))}")
        parts.append(f"number of nan iterations: {int(sum(sum(values(k)) for k in keys if k.startswith('nan_grads')))}")
        group("time/", "time (ms)", lambda v: f"{1000 * np.mean(v):.1f}")
        known = ("lr/", "loss/", "grad_norm/", "time/", "nan_grads", "skipped_iterations")
        for k in keys:
            if not k.startswith(known) and values(k):
                parts.append(f"{k}: {np.mean(values(k)):.4E}")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = torch.cuda.max_memory_allocated() / 2**30
            parts.append(f"mem peak (GiB): {peak:.2f}")
            self.scalar("memory/peak_gib", peak, step)
        parts.append(f"elapsed: {_hms(now - self.start_time)}")
        parts.append(f"ETA: {_hms(per_iter * (self.train_iters - step))}")
        return " | ".join(parts) + " |"

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        sys.stdout.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
