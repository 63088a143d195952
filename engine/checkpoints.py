"""What a training run keeps on disk and reads back on --resume: atomic files, last.pth and best.pth and their
cadence (written in the background), results.json, and the checks that a folder may be written or resumed.

Whatever ends a run (its last epoch, a stop signal, the time budget, a divergence) the loop leaves the folder
with last.pth, best.pth (from the first validated epoch on), history.csv, curves.png, val_samples.png and a
results.json that says whether the run completed and, if not, why and where it stopped."""
from __future__ import annotations

import csv
import json
import os
import pickle
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from cfg import UserError
from dataset import ClassTable

if TYPE_CHECKING:
    from engine.settings import Settings

# What a run leaves in its folder: a folder holding any of them holds a run.
RUN_FILES = ("last.pth", "best.pth", "history.csv", "results.json", "curves.png", "val_samples.png")


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


@dataclass
class Progress:
    """How far a run got, besides its weights and optimiser: what last.pth records for --resume."""

    epoch: int  # completed epochs
    best_miou: float
    history: list[dict]
    partial: dict  # the epoch in progress: optimizer steps, loss sum and count, training seconds
    budget: dict | None = None  # --time-budget's plan and the time spent


def checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
                     progress: Progress, config: dict, table: ClassTable, average: dict | None = None) -> dict:
    """last.pth: everything --resume needs; `epoch` counts completed epochs, `partial_epoch` the one in progress,
    `ema` the weight average (--ema) that best.pth holds."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": progress.epoch, "best_miou": progress.best_miou,
            "config": config, "history": progress.history, "partial_epoch": dict(progress.partial),
            "budget": progress.budget, "ema": average, **class_entries(table)}


def class_entries(table: ClassTable) -> dict:
    """The class table a checkpoint carries, so test.py, predict.py and export.py need no class_dict.csv."""
    return {"class_names": list(table.names), "class_table": table.to_dict()}


def best_state(model: torch.nn.Module, config: dict, epoch: int, metrics: dict, precision: str,
               table: ClassTable) -> dict:
    """best.pth: only what test.py, predict.py and --init-from read. The weights are copied on the device
    (cheap) because the file is written later, at the checkpoint cadence."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"model": weights, "config": config, "metrics": metrics, "epoch": epoch, "precision": precision,
            **class_entries(table)}


@dataclass
class Folder:
    """A run folder and its checkpoint cadence. Under torchrun every rank keeps one; rank 0's writes."""

    out: Path
    writes: bool = True  # rank 0
    save_every: float = 300.0  # --save-every
    clock: Callable[[], float] = time.perf_counter
    saved_at: float = 0.0  # clock() of the last checkpoint write
    saved_epoch: int = 0  # the epoch last.pth holds (0: none written by this process)
    checkpointed: bool = False  # last.pth exists (written, or resumed from)
    best: dict | None = None  # best.pth's state, waiting for the next checkpoint write
    pending: Future | None = None  # a checkpoint write under way in the background

    def prepare(self, history: list[dict]) -> None:
        """Create the folder; after a kill, rewrite history.csv from last.pth and drop stale temporaries."""
        self.saved_at = self.clock()
        if not self.writes:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if history:  # epochs after the last checkpoint are redone: the csv must not list them twice
            write_history(history, self.out / "history.csv")
        for stale in self.out.glob(".*.tmp*"):  # temporaries of atomic writes cut short by a kill
            stale.unlink(missing_ok=True)

    def due(self, validated: bool, final: bool) -> bool:
        """Whether this epoch writes the checkpoints: the first validated one (so a crash early on leaves a
        best.pth to test and a last.pth to resume), the last, and then every --save-every seconds."""
        first = validated and not self.checkpointed
        cadence = self.clock() - self.saved_at >= self.save_every
        return self.save_every <= 0 or first or final or cadence

    def write_checkpoints(self, last: dict, background: bool = False) -> None:
        """Write a pending best.pth, then last.pth (atomically). In this order a kill between the two leaves
        last.pth behind best.pth: --resume redoes those epochs and finds that best again, never loses it.
        In the `background` (one write at a time) from a copy of the state, while training goes on: most of
        a large write is waiting for the disk."""
        self.wait()
        best, self.best = self.best, None
        if background:
            writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
            self.pending = writer.submit(self.write_both, best, snapshot(last))
            writer.shutdown(wait=False)
        else:
            self.write_both(best, last)
        self.wrote(last["epoch"])

    def write_both(self, best: dict | None, last: dict) -> None:
        if best is not None:
            save_checkpoint(best, self.out / "best.pth")
        save_checkpoint(last, self.out / "last.pth")

    def wait(self) -> None:
        """Until a background write is on the disk (its error, if any, raised here)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def wrote(self, epoch: int) -> None:
        """last.pth now holds `epoch`: the --save-every clock starts again."""
        self.saved_at, self.checkpointed, self.saved_epoch = self.clock(), True, epoch

    def write_best(self) -> None:
        """Write best.pth if a better validated epoch is waiting for the next checkpoint write."""
        self.wait()
        if self.best is not None:
            save_checkpoint(self.best, self.out / "best.pth")
            self.best = None

    def write_results(self, results: dict) -> None:
        atomic_write(self.out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))


def snapshot(value):
    """A checkpoint state that later training steps cannot change: tensors copied to the CPU, containers
    rebuilt (history rows included), immutable values shared."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(item) for item in value)
    return value


def holds_a_run(out: Path) -> list[str]:
    """The run files a folder already holds (none: a new run may start there)."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_out(out: Path, resume: bool) -> None:
    """--out must be a folder, and a new run never writes into one that holds another run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; name a folder for the run")
    found = holds_a_run(out) if not resume and out.is_dir() else []
    if found:
        raise UserError(f"--out {out} already holds a run ({', '.join(found)}): continue it with --resume, "
                        f"or start a new one with another --out (e.g. --out {fresh_folder(out)})")


def fresh_folder(out: Path) -> Path:
    """The first of OUT-2, OUT-3, ... that holds no run."""
    number = 2
    while holds_a_run(out.with_name(f"{out.name}-{number}")):
        number += 1
    return out.with_name(f"{out.name}-{number}")


def load_resume(out: Path, settings: Settings, world_size: int) -> dict:
    """last.pth of the run folder `out`, or one line saying what happened and what to run instead."""
    path = out / "last.pth"
    if not out.is_dir():
        raise UserError(f"--resume: no run folder {out}; start the run without --resume")
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist: the run in {out} stopped before it saved a "
                        f"checkpoint (its first validated epoch); start it again without --resume")
    state = load_checkpoint(path)
    check_resume(settings, state["config"], path, world_size)
    return state


# Flags whose change --resume would otherwise ignore or mis-apply (the optimiser and LambdaLR restore their own)
KEPT_ON_RESUME = ("optimizer", "lr", "weight_decay", "momentum", "schedule", "backbone_lr_mult")


def check_resume(settings: Settings, config: dict, path: Path, world_size: int) -> None:
    """Refuse, in one line, a --resume whose settings would silently change what last.pth means: the process
    count and the samples per optimizer step (they define the schedule's length and the position inside an
    epoch), and the optimiser's settings that the saved state would override."""
    saved, optim, batch_size = config.get("train", {}), settings.optim, settings.data.batch_size
    saved_world = config.get("world_size", world_size)  # older checkpoints did not record it
    if saved_world != world_size:
        raise UserError(f"--resume: {path} was trained by {saved_world} process(es), this run has {world_size}: "
                        f"resume with {saved_world} (torchrun --nproc_per_node), or start a new run from its "
                        f"weights with --init-from {path} and another --out")
    batch, accum = saved.get("batch_size", batch_size), saved.get("accum_steps", 1)
    images = batch * accum
    if batch_size * optim.accum_steps != images:
        example = f"--batch-size {images // 2} --accum-steps 2" if images % 2 == 0 else f"--batch-size {images}"
        raise UserError(f"--resume: {path} was trained with {images} images per optimizer step per process "
                        f"(--batch-size {batch} --accum-steps {accum}), this run asks for "
                        f"{batch_size * optim.accum_steps}: keep the product (e.g. {example})")
    for name in KEPT_ON_RESUME:
        if name == "momentum" and optim.optimizer != "sgd":
            continue  # Adam has no momentum: the flag means nothing there
        was, now = saved.get(name, getattr(optim, name)), getattr(optim, name)
        if was != now:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"--resume: {path} was trained with {flag} {was}, this run asks for {now}: resume "
                            f"with {flag} {was}, or start a new run from its weights with --init-from {path} "
                            f"and another --out")
