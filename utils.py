"""Shared plumbing for the CLIs: devices, AMP, distributed set-up, checkpoints, logs and plots."""
from __future__ import annotations

import contextlib
import csv
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from cfg import UserError
from dataset import ClassTable, colorize
from fcn import FCN, FCNConfig, upgrade_state_dict


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


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self):
        self.requested = False  # this process got a signal
        self.stopping = False  # every process agreed to stop
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

    def agreed(self, device: torch.device, dist_info: DistInfo, step: int, every: int = 1) -> bool:
        """True when any process was asked to stop. Under torchrun the ranks compare flags (an all-reduce
        and a host sync) only when `step` is a multiple of `every`, so all of them leave at the same step."""
        if not dist_info.enabled:
            self.stopping = self.requested
        elif step % every == 0:
            flag = torch.tensor([int(self.requested)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stopping = bool(flag.item())
        if self.stopping and not self.signal_name:
            self.signal_name = "stop signal (another rank)"
        return self.stopping


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: a job-wide SIGINT/SIGTERM (SLURM, `timeout`, systemd) is the main
    process's to handle; a worker killed by it would crash the run before it can save."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


# ---------------------------------------------------------------- files

def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename it into place."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save a checkpoint dict atomically: a crash never leaves a truncated file."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on the CPU with weights_only=True; a missing or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        # torch's own message advises weights_only=False: arbitrary code execution, and wrong for a damaged file
        raise UserError(f"{path}: not a checkpoint written by this project, or damaged (truncated?)") from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not a checkpoint of this project (no model/config entries)")
    return state


def saved_table(state: dict) -> dict | None:
    """The class table a checkpoint (or an ONNX model's metadata) carries; older checkpoints only the names."""
    if "class_table" in state:
        return state["class_table"]
    return {"names": list(state["class_names"])} if state.get("class_names") else None


def trained_table(saved: dict | None, class_dict: str | Path | None, fallback: str | Path, source: str | Path) -> ClassTable:
    """The class table of a trained model: its own (`saved`), or --class-dict, which may only override it with
    the same class names (other colours); `fallback` serves a model that carries no colours."""
    if class_dict is None and saved is not None and "colors" in saved:
        return ClassTable.from_dict(saved)
    table = ClassTable.from_csv(class_dict or fallback)
    if saved is not None and tuple(saved["names"]) != table.names:
        flag = f"--class-dict {class_dict}" if class_dict else f"{fallback} (pass --class-dict)"
        raise UserError(f"{flag}: classes {', '.join(table.names)} differ from the {len(saved['names'])} that "
                        f"{source} was trained on: {', '.join(saved['names'])}")
    return table


def model_from_checkpoint(state: dict, table: ClassTable, source: str | Path) -> FCN:
    """Rebuild the network the checkpoint describes and check it fits the class table."""
    config = FCNConfig(**state["config"]["model"])
    if config.num_classes != table.num_classes:
        raise UserError(f"{source}: checkpoint predicts {config.num_classes} classes but the class table "
                        f"has {table.num_classes}")
    model = FCN(config)
    model.load_state_dict(upgrade_state_dict(state["model"]))
    return model


def wrappers(model: torch.nn.Module):
    """The model, then each module it wraps (DDP and/or torch.compile, nested in any order), the FCN last."""
    while True:
        yield model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # (tested by attribute: importing torch._dynamo costs seconds)
        else:
            return


def unwrap(model: torch.nn.Module) -> FCN:
    """The FCN inside DDP and/or torch.compile wrappers."""
    *_, inner = wrappers(model)
    return inner


def write_history(rows: list[dict], path: str | Path) -> None:
    """history.csv from the rows kept in the checkpoint, so the two never disagree."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            columns = dict.fromkeys(key for row in rows for key in row)  # rows of older runs may lack some
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
    if rows:
        atomic_write(path, write)


def plot_curves(rows: list[dict], path: str | Path) -> None:
    """Loss and validation metric curves per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validated = [row for row in rows if row["val_miou"] is not None]  # --eval-every skips some epochs
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([row["epoch"] for row in rows], [row["train_loss"] for row in rows], label="train")
    loss_axis.plot([row["epoch"] for row in validated], [row["val_loss"] for row in validated], label="val")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for key, label in (("val_miou", "MIoU"), ("val_pa", "PA"), ("val_mpa", "MPA")):
        metric_axis.plot([row["epoch"] for row in validated], [row[key] for row in validated], label=label)
    metric_axis.set(xlabel="epoch", ylim=(0, 1), title="validation")
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))
    plt.close(figure)


def sample_grid(images: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor, table: ClassTable) -> Image.Image:
    """Rows of photo | truth | prediction for a few samples (uint8 N×3×H×W images, N×H×W labels)."""
    rows = []
    for image, target, predicted in zip(images.cpu(), truth.cpu().numpy(), prediction.cpu().numpy()):
        rows.append(np.concatenate([image.permute(1, 2, 0).numpy(), colorize(target, table),
                                    colorize(predicted, table)], axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))


def fail(message: str, code: int = 2) -> None:
    """Print one clear line and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_script(main: Callable[[], object]) -> None:
    """A script's entry point: a UserError (bad flag, file or data) becomes one `error: ...` line and exit 2."""
    try:
        main()
    except UserError as error:
        fail(str(error))


def run_results(history: list[dict], config: dict, device: str, command: str) -> dict:
    """results.json of a run: the best val epoch's metrics (null before the first validation) and how the
    run was made. wall_s sums the epochs' own time, start-up excluded."""
    validated = [row for row in history if row["val_miou"] is not None]
    best = max(validated, key=lambda row: row["val_miou"]) if validated else {}
    train = config.get("train", {})
    return {"split": "val", "miou": best.get("val_miou"), "pixel_accuracy": best.get("val_pa"),
            "mean_pixel_accuracy": best.get("val_mpa"),
            "iou": {key[len("iou_"):]: value for key, value in best.items() if key.startswith("iou_")},
            "best_epoch": best.get("epoch"), "device": device, "epochs": history[-1]["epoch"] if history else 0,
            "wall_s": round(sum(row["seconds"] for row in history), 1), "command": command,
            "pretrained": bool(train.get("pretrained")), "model": config.get("model"),
            "date": time.strftime("%Y-%m-%d")}
