"""Timing harness shared by the benchmark scripts: median / min milliseconds and peak activation memory, and how the
results are printed and saved."""

import json
import time

import torch


def timed(fn, iters: int, warmup: int = 2):
    if not torch.cuda.is_available():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        times.sort()
        return {"ms_median": times[len(times) // 2], "ms_min": times[0], "peak_activation_gib": float("nan")}
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"ms_median": times[len(times) // 2], "ms_min": times[0],
            "peak_activation_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}


def timing_line(name: str, r: dict, width: int = 20) -> str:
    return f"{name:{width}s} {r['ms_median']:9.1f} ms  peak +{r['peak_activation_gib']:.2f} GiB"


def save(results: dict, out: str | None) -> None:
    """Print all results as JSON and write them to `out` when given."""
    print(json.dumps(results, indent=2))
    if out:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=2)
