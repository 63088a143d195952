"""What a run reports: the console lines (start, pace, epochs, plan, end), history.csv, results.json and
TensorBoard (rank 0)."""
from __future__ import annotations

import time

import numpy as np

import cfg
import devices
from devices import unwrap
from engine import budget as budget_clock
from engine.budget import format_duration
from engine.checkpoints import RUN_FILES
from engine.plots import sample_grid
from engine.run import Run
from engine.schedule import Schedule


def run_results(history: list[dict], config: dict, device: str, command: str, last: bool = False) -> dict:
    """results.json of a run: the metrics of the best val epoch (with `last`, of the last validated one: the
    epoch best.pth holds; null before the first validation) and how the run was made. wall_s sums the epochs'
    own time, start-up excluded."""
    validated = [row for row in history if row["val_miou"] is not None]
    pick = (lambda rows: rows[-1]) if last else (lambda rows: max(rows, key=lambda row: row["val_miou"]))
    best = pick(validated) if validated else {}
    train = config.get("train", {})
    return {"split": "val", "miou": best.get("val_miou"), "pixel_accuracy": best.get("val_pa"),
            "mean_pixel_accuracy": best.get("val_mpa"),
            "iou": {key[len("iou_"):]: value for key, value in best.items() if key.startswith("iou_")},
            "best_epoch": best.get("epoch"), "device": device, "epochs": history[-1]["epoch"] if history else 0,
            "wall_s": round(sum(row["seconds"] for row in history), 1), "command": command,
            "pretrained": bool(train.get("pretrained")), "model": config.get("model"),
            "date": time.strftime("%Y-%m-%d"), "validated_epochs": len(validated)}


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


def epoch_label(epoch: int, schedule: Schedule) -> str:
    """'epoch 5/109' (the planned count; none while a budget measures its first epoch)."""
    return f"epoch {epoch}/{schedule.epochs}" if schedule.total is not None else f"epoch {epoch}"


def start_block(run: Run) -> str:
    """What the run is about to do, in one short block."""
    data, optim, runtime, schedule = run.settings.data, run.settings.optim, run.runtime, run.schedule
    model, world, batch, accum = unwrap(run.model), runtime.dist.world_size, data.batch_size, optim.accum_steps
    width = f", fc width {model.config.fc_width}" if model.config.fc_width else ""
    shrunk = f", shrunk {data.downscale:g}x" if data.downscale != 1 else ""
    shape = f"{batch} x {accum} batches" if accum > 1 else f"batch {batch}"
    if runtime.budget is None:
        plan = f"{schedule.epochs} epochs"
    elif runtime.budget.planned:
        plan = f"{schedule.epochs} epochs planned within --time-budget {format_duration(runtime.budget.seconds)}"
    else:
        plan = (f"--time-budget {format_duration(runtime.budget.seconds)}: as many epochs as fit (at most "
                f"{optim.epochs}), planned after epoch {run.start_epoch}")
    resumed = f"; resuming at epoch {run.start_epoch}, step {run.progress.steps}" if run.settings.run.resume else ""
    return "\n".join([
        f"device   {devices.device_name(runtime.device)}, {devices.precision_name(runtime.amp)}"
        + (f", {world} processes" if world > 1 else ""),
        f"model    {model.config.variant} on {model.config.backbone}{width}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters",
        f"data     {data.root}: {len(run.train_loader.dataset)} train, {len(run.val_loader.dataset)} val "
        f"images{shrunk}, crops {data.crop_size[0]}x{data.crop_size[1]}"
        + (f", validated at {data.test_scale:g}x (--test-scale)" if data.test_scale != 1 else ""),
        f"steps    {batch * accum * world} images a step ({shape}" + (f" x {world} processes" if world > 1 else "")
        + f"), {schedule.steps_per_epoch} steps an epoch",
        f"plan     {plan}{resumed}",
        f"output   {run.settings.run.out}"])


def estimate_line(run: Run, per_step: float) -> str:
    """After the first few steps: the pace, and the whole run's wall time at that pace (validation guessed at
    a third of a training step per image) or, before a budget's first plan, the epochs it may fit."""
    schedule, budget, settings = run.schedule, run.runtime.budget, run.settings
    images_per_step = settings.data.batch_size * settings.optim.accum_steps * run.runtime.dist.world_size
    val = per_step * len(run.val_loader.dataset) / (3 * images_per_step)
    epoch = per_step * schedule.steps_per_epoch + val / run.cadence.every
    pace = f"pace     {per_step:.2f} s a step, ~{format_duration(epoch)} an epoch"
    if budget is not None and not budget.planned:
        return pace + f": the {format_duration(budget.seconds)} budget fits about {int(budget.left() / epoch)} epochs"
    steps_left = schedule.total - run.scheduler.last_epoch
    whole = budget_clock.process_age() + steps_left * epoch / schedule.steps_per_epoch
    return pace + f": the whole run ({schedule.epochs} epochs) takes about {format_duration(whole)}"


def epoch_line(run: Run, epoch: int, row: dict, seconds: float) -> str:
    """One line per epoch: losses, val metrics, its time and the time left for the whole run."""
    val = (f"val_loss {row['val_loss']:.4f} PA {row['val_pa']:.4f} MPA {row['val_mpa']:.4f} "
           f"MIoU {row['val_miou']:.4f}") if row["val_miou"] is not None else "(not validated)"
    budget, schedule = run.runtime.budget, run.schedule
    if budget is not None:
        left = f"{format_duration(max(0.0, budget.left()))} of the budget left"
    else:
        left = f"~{format_duration((schedule.epochs - epoch) * seconds)} left"
    return f"{epoch_label(epoch, schedule)}: train_loss {row['train_loss']:.4f} {val} ({seconds:.1f}s; {left})"


def plan_line(run: Run) -> str:
    """A budget's first plan, in one line."""
    budget, schedule = run.runtime.budget, run.schedule
    costs = budget.costs
    return (f"time budget {format_duration(budget.seconds)}: {schedule.epochs} epochs ({schedule.total} steps of "
            f"~{costs.step:.3f} s; val {costs.val:.1f} s every {run.cadence.every}, checkpoint {costs.save:.1f} s; "
            f"{budget.spent():.0f} s spent), warm-up {schedule.warmup_epochs}, planned again after every epoch")


def end_block(run: Run) -> str:
    """How the run ended: best val MIoU and its epoch, wall time, the files and the commands that use them."""
    out, keep_last = run.settings.run.out, run.settings.keep_last
    best, which = run_results(run.history, {}, "", "", last=keep_last), "last" if keep_last else "best"
    lines = [f"run      {len(run.history)} epochs, {format_duration(budget_clock.process_age())} in this process; "
             + (f"{which} val MIoU {best['miou']:.4f} (epoch {best['best_epoch']})" if best["miou"] is not None
                else "not validated yet")]
    if run.runtime.budget is not None:
        budget = run.runtime.budget
        lines.append(f"budget   {budget.spent():.0f} s of {budget.seconds:.0f} s used "
                     f"({100 * budget.spent() / budget.seconds:.1f} %), the end planned {len(budget.replans)} times")
    memory = devices.peak_memory(run.runtime.device)
    lines.append(f"memory   peak {memory['peak_memory_mb']} MB "
                 + ("allocated on the GPU" if memory["peak_memory_of"] == "cuda" else "resident in this process"))
    lines.append(f"files    {out}/ " + " ".join(name for name in RUN_FILES if (out / name).exists()))
    root = str(run.settings.data.root)
    data = f" --data-root {root}" if root != cfg.default_data_root() else ""
    if (out / "best.pth").exists():
        lines += [f"next     python test.py --weights {out / 'best.pth'}{data} --split val",
                  f"         python predict.py --weights {out / 'best.pth'} --input photo.jpg --out masks --overlay"]
    return "\n".join(lines)


def open_board(run: Run):
    """--tensorboard's writer, in the run folder; a resumed run replaces the events of the epochs it redoes."""
    if not run.settings.run.tensorboard:
        return None
    from torch.utils.tensorboard import (
        SummaryWriter,  # an optional install, checked by train.py's check_args
    )
    return SummaryWriter(str(run.settings.run.out), purge_step=run.start_epoch)


def log_board(run: Run, row: dict, samples: tuple | None) -> None:
    """One epoch in TensorBoard: losses, lr, val metrics with the per-class IoU, the val samples image."""
    board, epoch = run.board, row["epoch"]
    board.add_scalar("train/loss", row["train_loss"], epoch)
    board.add_scalar("train/lr", row["lr"], epoch)
    if row["val_miou"] is not None:
        for key in ("val_loss", "val_pa", "val_mpa", "val_miou"):
            board.add_scalar(f"val/{key[len('val_'):]}", row[key], epoch)
        for name in run.table.names:
            board.add_scalar(f"val_iou/{name}", row[f"iou_{name}"], epoch)
    if samples is not None:
        board.add_image("val/samples", np.asarray(sample_grid(*samples, run.table)), epoch,
                        dataformats="HWC")
    board.flush()


def write_results(run: Run, stopped: str | None = None, epoch: int | None = None) -> None:
    """results.json: the metrics of the epoch best.pth holds, how the run was made, and whether it completed."""
    settings, runtime = run.settings, run.runtime
    results = run_results(run.history, run.config(), devices.device_name(runtime.device), settings.command,
                          last=settings.keep_last)
    results.update(completed=stopped is None, precision=devices.precision_name(runtime.amp),
                   train_splits=list(settings.data.train_splits), val_held_out=not settings.data.val_trained_on,
                   best_pth="last epoch" if settings.keep_last else "best val epoch", ema=settings.run.ema or None,
                   eval_every=settings.run.eval_every or "auto", **devices.peak_memory(runtime.device))
    if stopped is not None:
        results.update(stop_reason=stopped, stopped_epoch=epoch)
    if runtime.budget is not None:
        results["time_budget"] = {**runtime.budget.state(), "epochs": run.schedule.epochs}
    run.folder.write_results(results)
