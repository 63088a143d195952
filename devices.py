"""Where a run computes: the device and its name, the precision (autocast dtype), data-loader workers, the
torchrun process group and the one decision its ranks agree on, stop signals, and the model inside its
wrappers."""
from __future__ import annotations

import contextlib
import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from cfg import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA on a machine without it is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device: expected auto, cpu or cuda, got '{name}'")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """A readable name of the device for logs and results.json."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError, IndexError):  # Linux names the processor in /proc/cpuinfo
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")][0] + ", "
    return f"cpu ({model}{os.cpu_count()} cores)"


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype: on CUDA bf16 where the GPU has it, else fp16; on a CPU bf16 where it computes bf16
    natively (AVX512-BF16 or AMX, where oneDNN's bf16 convolutions run about 2x fp32), else None (fp32,
    since emulated bf16 is slower than fp32); None when disabled."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.bfloat16 if cpu_native_bf16() else None


def cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def precision_name(dtype: torch.dtype | None) -> str:
    """'bf16', 'fp16' or 'fp32': what results.json and test.py --json record."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def native_bf16() -> bool:
    """bf16 in hardware: emulated bf16 (pre-Ampere GPUs) is slower than fp16 with a scaler."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation and counts only native support
        return torch.cuda.is_bf16_supported()


def peak_memory(device: torch.device) -> dict:
    """The process's peak memory so far: on CUDA what PyTorch allocated on the GPU, elsewhere the resident set."""
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2 ** 20), "peak_memory_of": "cuda"}
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "peak_memory_of": "rss"}


def default_workers() -> int:
    """Data-loader processes: up to 8, leaving 2 cores to the main process and its pin-memory thread."""
    return max(1, min(8, (os.cpu_count() or 1) - 2))


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The one autocast context of the project: a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1: NCCL on CUDA, gloo on CPU."""
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def agree(device: torch.device, info: DistInfo, everyone: list[float],
          main: list[float]) -> tuple[list[float], list[float]]:
    """One all-reduce that makes every rank take the same decision: the sums over the ranks of `everyone`
    (flags any rank may raise, counts) and rank 0's `main` (its plan: its clock and costs are the run's).
    Run plainly, the values themselves."""
    if not info.enabled:
        return list(everyone), list(main)
    values = torch.tensor([*everyone, *(main if info.is_main else [0.0] * len(main))], dtype=torch.float64,
                          device=device)
    dist.all_reduce(values)
    summed = values.tolist()
    return summed[:len(everyone)], summed[len(everyone):]


class StopFlag:
    """Turns SIGINT/SIGTERM (or a budget's deadline) into a request to stop after the current step."""

    def __init__(self):
        self.requested = False  # this process was asked to stop
        self.stopping = False  # the ranks agreed to stop
        self.signal_name = ""

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask to stop after the current step (a signal's name, or "time budget")."""
        if not self.requested:
            self.requested, self.signal_name = True, reason

    def agreed(self, anyone: bool) -> bool:
        """Take the ranks' agreement (whether any rank asked to stop, devices.agree): from then on every rank
        is stopping, at the same step."""
        self.stopping = self.stopping or anyone
        if self.stopping and not self.signal_name:
            self.signal_name = "stop signal (another rank)"
        return self.stopping


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: a job-wide SIGINT/SIGTERM (SLURM, `timeout`, systemd) is the main
    process's to handle; a worker killed by it would crash the run before it can save."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def wrappers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model, then each module it wraps (DDP and/or torch.compile, nested in any order), the FCN last."""
    while True:
        yield model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # (tested by attribute: importing torch._dynamo costs seconds)
        else:
            return


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The FCN inside DDP and/or torch.compile wrappers."""
    *_, inner = wrappers(model)
    return inner
