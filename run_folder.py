"""A training run's folder: checkpoints and their cadence, history, plots, results.json and the resume checks.

Whatever ends a run (its last epoch, a stop signal, the time budget, a divergence) the folder holds
last.pth, best.pth (from the first validated epoch on), history.csv, curves.png, val_samples.png and a
results.json that says whether the run completed and, if not, why and where it stopped."""
from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

import devices
from cfg import UserError
from dataset import ClassTable, colorize

if TYPE_CHECKING:
    from train import Run


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, flush it to the disk, rename it into place and flush
    the folder: a kill, a crash or a power loss leaves the old file or the new one, never a truncated one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        fsync(temporary)
        os.replace(temporary, path)
        fsync(path.parent)  # the rename itself is an entry of the folder
    finally:
        temporary.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's) data from the page cache to the disk."""
    if path.is_dir() and os.name != "posix":  # only POSIX opens folders
        return
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


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


def run_config(run: Run) -> dict:
    """The resolved configuration: the model's and every training flag (paths as strings)."""
    return {"model": devices.unwrap(run.model).config.to_dict(),
            "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items()}}


def checkpoint_state(run: Run, epoch: int) -> dict:
    """Everything --resume needs; `epoch` counts completed epochs, `partial_epoch` the one in progress."""
    return {"model": devices.unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
            "best_miou": run.best_miou, "config": run_config(run), "history": run.history,
            "partial_epoch": dict(run.done), "budget": run.budget.state() if run.budget else None,
            **class_entries(run.table)}


def class_entries(table: ClassTable) -> dict:
    """The class table a checkpoint carries, so test.py, predict.py and export.py need no class_dict.csv."""
    return {"class_names": list(table.names), "class_table": table.to_dict()}


def best_state(run: Run, epoch: int, metrics: dict) -> dict:
    """best.pth: only what test.py, predict.py and --init-from read. The weights are copied on the device
    (cheap) because the file is written later, at the checkpoint cadence."""
    weights = {k: v.detach().clone() for k, v in devices.unwrap(run.model).state_dict().items()}
    return {"model": weights, "config": run_config(run), "metrics": metrics, "epoch": epoch,
            "precision": devices.precision_name(run.loop.amp), **class_entries(run.table)}


def history_row(epoch: int, lr: float, train_loss: float, metrics: dict | None, names) -> dict:
    """One history.csv row: the issue's columns, then the per-class IoU; val columns are None (empty in
    the csv) for an epoch --eval-every skipped. The *seconds columns are filled by set_times."""
    val = metrics or {}
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": val.get("loss"),
           "val_pa": val.get("pixel_accuracy"), "val_mpa": val.get("mean_pixel_accuracy"),
           "val_miou": val.get("miou"), "seconds": 0.0, "train_seconds": 0.0, "val_seconds": 0.0,
           "other_seconds": 0.0}
    row.update({f"iou_{name}": val["iou"][i] if val else None for i, name in enumerate(names)})
    return row


def set_times(row: dict, train: float, val: float, other: float) -> None:
    """Where the epoch's wall time went: training, validation, everything else (logs, plots, checkpoints)."""
    row.update(train_seconds=round(train, 3), val_seconds=round(val, 3), other_seconds=round(other, 3))
    row["seconds"] = round(train + val + other, 3)


def prepare(run: Run) -> None:
    """Create the run folder; after a kill, rewrite history.csv from last.pth and drop stale temporaries."""
    run.saved_at = time.perf_counter()
    if not run.loop.dist.is_main:
        return
    run.args.out.mkdir(parents=True, exist_ok=True)
    if run.history:  # epochs after the last checkpoint are redone: the csv must not list them twice
        write_history(run.history, run.args.out / "history.csv")
    for stale in run.args.out.glob(".*.tmp*"):  # temporaries of atomic writes cut short by a kill
        stale.unlink(missing_ok=True)


def due(run: Run, epoch: int, validated: bool) -> bool:
    """Whether this epoch writes the checkpoints: the first validated one always (so a crash early on leaves
    a best.pth to test and a last.pth to resume), the last, and then every --save-every seconds."""
    first = validated and not run.checkpointed
    cadence = time.perf_counter() - run.saved_at >= run.args.save_every
    return run.args.save_every <= 0 or first or epoch == run.args.epochs or cadence


def save(run: Run, epoch: int, samples: bool = True) -> None:
    """Checkpoints, curves and (unless the weights are unusable) the val samples: one complete folder."""
    save_checkpoints(run, epoch)
    write_plots(run, samples)


def write_plots(run: Run, samples: bool = True) -> None:
    """curves.png from the history so far, val_samples.png from the model as it is."""
    if run.history:
        plot_curves(run.history, run.args.out / "curves.png")
    if samples:
        write_samples(*run.samples(), run.table, run.args.out / "val_samples.png")


def save_checkpoints(run: Run, epoch: int) -> None:
    """Write a pending best.pth, then last.pth (atomically). In this order a kill between the two leaves
    last.pth behind best.pth: --resume redoes those epochs and finds that best again, never loses it."""
    save_best(run)
    save_checkpoint(checkpoint_state(run, epoch), run.args.out / "last.pth")
    run.saved_at, run.checkpointed, run.saved_epoch = time.perf_counter(), True, epoch


def save_best(run: Run) -> None:
    """Write best.pth if a better validated epoch is waiting for the next checkpoint write."""
    if run.best is not None:
        save_checkpoint(run.best, run.args.out / "best.pth")
        run.best = None


def write_samples(images: torch.Tensor, labels: torch.Tensor, prediction: torch.Tensor, table: ClassTable,
                  path: Path) -> None:
    """val_samples.png: a few val images with truth and prediction side by side."""
    grid = sample_grid(images, labels, prediction, table)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def write_results(run: Run, stopped: str | None = None, epoch: int | None = None) -> None:
    """results.json: the best validated epoch's metrics, how the run was made, and whether it completed."""
    command = "python train.py " + " ".join(sys.argv[1:])
    results = run_results(run.history, run_config(run), devices.device_name(run.loop.device), command)
    results.update(completed=stopped is None, precision=devices.precision_name(run.loop.amp))
    if stopped is not None:
        results.update(stop_reason=stopped, stopped_epoch=epoch)
    if run.budget is not None:
        results["time_budget"] = {"seconds": run.budget.seconds, "spent": round(run.budget.spent(), 1),
                                  "epochs": run.budget.epochs}
    atomic_write(run.args.out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))


def check_out(out: Path) -> None:
    """--out must be a folder (or not exist yet)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; name a folder for the run")


def load_resume(args: argparse.Namespace) -> dict:
    """last.pth of the run folder, or one line saying what happened and what to run instead."""
    path = args.out / "last.pth"
    if not args.out.is_dir():
        raise UserError(f"--resume: no run folder {args.out}; start the run without --resume")
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist: the run in {args.out} stopped before it saved a "
                        f"checkpoint (its first validated epoch); start it again without --resume")
    state = load_checkpoint(path)
    check_resume(args, state["config"].get("train", {}), path)
    return state


def check_resume(args: argparse.Namespace, saved: dict, path: Path) -> None:
    """Refuse a --resume whose flags would silently change what last.pth means: the samples per optimizer
    step (they define the schedule's length and the position inside an epoch) and the backbone's lr factor
    (it shapes the optimizer's groups and their base lr)."""
    batch, accum = saved.get("batch_size", args.batch_size), saved.get("accum_steps", 1)
    images = batch * accum
    if args.batch_size * args.accum_steps != images:
        example = f"--batch-size {images // 2} --accum-steps 2" if images % 2 == 0 else f"--batch-size {images}"
        raise UserError(f"--resume: {path} was trained with {images} images per optimizer step per process "
                        f"(--batch-size {batch} --accum-steps {accum}), this run asks for "
                        f"{args.batch_size * args.accum_steps}: keep the product (e.g. {example})")
    mult = saved.get("backbone_lr_mult", 1.0)
    if args.backbone_lr_mult != mult:
        raise UserError(f"--resume: {path} was trained with --backbone-lr-mult {mult}, this run asks for "
                        f"{args.backbone_lr_mult}: resume with {mult}, or start a new run with --init-from")


def diverged(run: Run, epoch: int, error: Exception) -> None:
    """NaN/inf loss: keep the last good last.pth, write a pending better best.pth, curves, samples of the
    last good weights and results.json (rank 0)."""
    if not run.loop.dist.is_main:
        return
    good = run.best["model"] if run.best is not None else None
    save_best(run)
    if good is None and (run.args.out / "best.pth").is_file():
        good = load_checkpoint(run.args.out / "best.pth")["model"]
    try:
        if good is not None:
            devices.unwrap(run.model).load_state_dict(good)
    except RuntimeError:  # a best.pth of another model left in the folder: no samples rather than wrong ones
        good = None
    write_plots(run, samples=good is not None)
    write_results(run, f"diverged: {error}", epoch)


def finish(run: Run) -> None:
    """The last epoch's checkpoint and results.json of a completed run (rank 0)."""
    if not run.loop.dist.is_main:
        return
    if run.start_epoch > run.args.epochs:
        print(f"{run.args.out / 'last.pth'} already has {run.start_epoch - 1} epochs; raise --epochs to train more")
    elif run.history:
        if run.saved_epoch != run.history[-1]["epoch"]:  # a budget fixed the count after the last epoch's check
            save(run, run.history[-1]["epoch"])
        write_results(run)
