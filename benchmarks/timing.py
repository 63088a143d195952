"""How bench.py times: device syncs, medians of alternating blocks, warm-up, peak memory."""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch

from benchmarks.plan import Plan


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds for `calls` back-to-back calls, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def side_by_side(runs: dict[str, Callable[[], object]], plan: Plan, device: torch.device) -> dict[str, dict]:
    """Warm every run up, then alternate their timed blocks; median seconds per call and, per run, the GPU peak
    above what was allocated at the reset: the other runs' weights, gradients and optimizer state stay allocated
    and would otherwise count in every run's peak."""
    for fn in runs.values():
        timed(fn, plan.warmup, device)
    seconds = {name: [] for name in runs}
    peaks = {name: 0.0 for name in runs}
    for _ in range(plan.repeats):
        for name, fn in runs.items():
            base = 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device) / 2 ** 20
            seconds[name].append(timed(fn, plan.steps, device) / plan.steps)
            peaks[name] = max(peaks[name], (gpu_peak_mb(device) or 0.0) - base)
    return {name: {"seconds": statistics.median(seconds[name]),
                   "peak_mb": peaks[name] if device.type == "cuda" else None} for name in runs}


def gpu_peak_mb(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated in MiB since the last reset (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def process_peak_mb(device: torch.device, run_peak: float) -> float:
    """Peak of the run: GPU memory allocated by torch, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return max(run_peak, gpu_peak_mb(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def warm_up(fn: Callable[[], object], seconds: float, device: torch.device) -> int:
    """Call fn until at least `seconds` have passed, GPU work included; returns the number of calls."""
    calls, spent = 0, 0.0
    while spent < seconds:
        spent += timed(fn, 1, device)
        calls += 1
    return calls
