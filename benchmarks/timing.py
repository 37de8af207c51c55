"""Timing harness shared by the benchmark scripts: median / min milliseconds and peak activation memory."""

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
