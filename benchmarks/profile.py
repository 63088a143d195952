"""Where a train step's time goes: torch.profiler over a few fast-path steps, the operators (on a GPU, the CUDA
kernels' device time) that take the most of it."""
from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.models import model_config, prepare, synthetic_batch, train_step
from benchmarks.plan import Mode, Plan
from benchmarks.timing import synchronize
from fcn import FCN


def top_operators(step: Callable[[], None], device: torch.device, steps: int = 5, rows: int = 15) -> list[dict]:
    """The `rows` operators with the most self time over `steps` calls of `step` (after two untimed ones): name,
    calls per step, milliseconds per step and share of the profiled time. On CUDA the time is the kernels' on the
    device, elsewhere the operators' on the CPU."""
    for _ in range(2):
        step()
    synchronize(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [event for event in profiler.key_averages() if getattr(event, key) > 0]
    total = sum(getattr(event, key) for event in events) or 1.0
    events.sort(key=lambda event: getattr(event, key), reverse=True)
    return [{"name": event.key, "calls_per_step": event.count / steps,
             "ms_per_step": getattr(event, key) / 1000 / steps, "share": getattr(event, key) / total}
            for event in events[:rows]]


def profile_train_step(plan: Plan, mode: Mode, device: torch.device, num_classes: int, steps: int = 5) -> list[dict]:
    """top_operators of the plan's FCN-8s train step in `mode` (the fast path)."""
    torch.manual_seed(0)
    model = prepare(FCN(model_config(plan, num_classes)), mode, device)
    batch = synthetic_batch(plan.train_batch, plan.train_size, num_classes)
    return top_operators(train_step(model, mode, device, batch), device, steps)


def profile_rows(rows: list[dict]) -> list[str]:
    """The profile as printable lines."""
    width = max([len("operator")] + [min(len(row["name"]), 60) for row in rows])
    lines = [f"{'operator':<{width}}  {'calls/step':>10}  {'ms/step':>9}  {'share':>6}"]
    lines += [f"{row['name'][:60]:<{width}}  {row['calls_per_step']:>10.1f}  {row['ms_per_step']:>9.2f}  "
              f"{100 * row['share']:>5.1f}%" for row in rows]
    return lines
