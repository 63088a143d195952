"""The training loop: epochs of training, validation, logging and checkpoints until the schedule's last step,
and a complete run folder whatever ends the run (its end, a stop signal, the time budget, a divergence)."""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import devices
import inference
from devices import unwrap
from engine.budget import GUESSED_WRITE, BudgetTooSmall, format_duration
from engine.checkpoints import Progress, best_state, checkpoint_state, load_checkpoint, write_history
from engine.control import TrainingDiverged, agree_at_epoch_end, decide_after_step, follow_plan
from engine.plots import plot_curves, write_samples
from engine.report import (end_block, epoch_label, epoch_line, estimate_line, history_row, log_board, open_board,
                           plan_line, set_times, start_block, write_results)
from engine.run import EpochProgress, Run, Runtime
from engine.schedule import at_end, schedule_of
from engine.step import accumulation_step, batch_groups, to_device
from engine.warmup import warm_up


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, loss_fn: nn.Module, runtime: Runtime, epoch: int,
                    progress: EpochProgress) -> bool:
    """One pass over the loader, an optimizer step per --accum-steps batches, ending early at the schedule's
    last step; `progress` carries the optimizer steps, loss sum and count (also across a resume). Returns False
    when the ranks agreed to stop (a signal, or a budget whose measured epoch did not fit)."""
    model.train()
    loss_sum = torch.full((), progress.loss_sum, device=runtime.device, dtype=torch.float64)  # no host sync
    bar = tqdm(loader, desc=epoch_label(epoch, schedule_of(scheduler)), disable=not runtime.dist.is_main,
               dynamic_ncols=True)
    steps = math.ceil(len(loader) / runtime.accum_steps)  # left in this epoch
    for step, group in enumerate(batch_groups(bar, runtime.accum_steps), 1):
        batches = [to_device(images, labels, runtime) for images, labels in group]
        loss = accumulation_step(model, batches, optimizer, scaler, loss_fn, runtime, epoch, progress.steps)
        scheduler.step()
        images_in_step = sum(len(labels) for _, labels in batches)
        loss_sum += loss.double() * images_in_step
        progress.steps += 1
        progress.count += images_in_step
        # Stops fall between optimizer steps only: no half-accumulated gradient is ever lost. At the loader's
        # end the loop ends by itself (and the bar shows the whole epoch).
        ends = decide_after_step(runtime, scheduler, loss_sum, progress, epoch, bar)
        if ends and (step < steps or runtime.stop_flag.stopping):
            break
    progress.loss_sum = epoch_loss_on_host(loss_sum)
    return not runtime.stop_flag.stopping


def epoch_loss_on_host(loss_sum: torch.Tensor) -> float:
    """The epoch's loss sum as a number: the training loop's one host sync besides the --log-every steps."""
    return loss_sum.item()


def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, runtime: Runtime, scale: float = 1.0) -> dict:
    """Val metrics through the project's one inference path, the one test.py scores with: a confusion matrix
    over the whole split, the mean per-pixel loss; the model run at `scale` x the val images (--test-scale)."""
    return inference.evaluate(model, loader, num_classes, runtime.device, runtime.amp, runtime.channels_last,
                              scale=scale)


def val_samples(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to 3 val images spread over the split, their labels and the model's prediction."""
    runtime = run.runtime
    runner = inference.Runner(run.inference_model(), runtime.device, runtime.amp, runtime.channels_last,
                              run.settings.data.test_scale)
    return inference.sample_predictions(runner, run.val_loader.dataset)


def validate(run: Run) -> dict:
    """Val metrics of the model every rank holds (the weight average with --ema)."""
    sync_buffers(run.inference_model(), run.runtime.dist)
    # Eager and without DDP: no gradients to synchronise, and no second compiled graph (eval mode) to build.
    return evaluate(run.inference_model(), run.val_loader, run.table.num_classes, run.runtime,
                    run.settings.data.test_scale)


def sync_buffers(model: nn.Module, dist_info: devices.DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank: without SyncBatchNorm each
    rank's last forward updated its own copy, but validation must score the one model last.pth saves."""
    if dist_info.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def end_of_epoch(run: Run, epoch: int, metrics: dict | None, val_seconds: float, final: bool) -> None:
    """Log every epoch; checkpoint, plot and draw samples when the folder's cadence says so (always at the last
    epoch and at a budget's measured one, whose write it times). best.pth is judged on validated epochs only,
    or is the latest epoch (--best last); rank 0 alone writes files."""
    started, main, budget = time.perf_counter(), run.is_main, run.runtime.budget
    row = history_row(epoch, run.optimizer.param_groups[0]["lr"], run.progress.mean_loss, metrics, run.table.names)
    run.history.append(row)
    improved = metrics is not None and metrics["miou"] > run.best_miou
    if improved:
        run.best_miou = metrics["miou"]
    if improved or run.settings.keep_last:
        run.folder.best = (best_state(run.inference_model(), run.config(), epoch, metrics,
                                      devices.precision_name(run.runtime.amp), run.table) if main else None)
    train_seconds, run.progress = run.progress.train_seconds, EpochProgress()
    if not main:
        return
    print(epoch_line(run, epoch, row, train_seconds + val_seconds))
    set_times(row, train_seconds, val_seconds, time.perf_counter() - started)  # last.pth holds them too
    measuring = budget is not None and not budget.planned
    samples = val_samples(run) if metrics is not None and run.board is not None else None
    if run.folder.due(metrics is not None, final or measuring):
        writing = time.perf_counter()
        # A budget plans with what a write costs: it writes in the foreground, and the last write always is
        samples = save(run, epoch, samples, background=budget is None and not final)
        if budget is not None:
            budget.measured(save=time.perf_counter() - writing)
    set_times(row, train_seconds, val_seconds, time.perf_counter() - started)
    write_history(run.history, run.settings.run.out / "history.csv")  # small: every epoch
    if run.board is not None:
        log_board(run, row, samples)


def save(run: Run, epoch: int, samples: tuple | None = None, background: bool = False) -> tuple:
    """Checkpoints (in the `background` while training goes on), curves and the val samples: one complete
    folder. Returns the samples drawn."""
    runtime, out = run.runtime, run.settings.run.out
    progress = Progress(epoch, run.best_miou, run.history, run.progress.to_dict(),
                        runtime.budget.state() if runtime.budget else None)
    average = runtime.average.state_dict() if runtime.average is not None else None
    run.folder.write_checkpoints(checkpoint_state(unwrap(run.model), run.optimizer, run.scheduler, run.scaler,
                                                  progress, run.config(), run.table, average), background)
    if run.history:
        plot_curves(run.history, out / "curves.png")
    samples = samples or val_samples(run)
    write_samples(*samples, run.table, out / "val_samples.png")
    return samples


def fit(run: Run) -> None:
    """The epoch loop: train, validate, log, checkpoint, until the schedule's last step (a budget plans it after
    the first epoch and again as the run goes). Whatever ends the run, the folder is complete: a stop signal
    saves and exits cleanly, a divergence keeps the last good checkpoints."""
    run.runtime.stop_flag.install()
    run.folder.prepare(run.history)
    if run.is_main:
        print(start_block(run))
        run.runtime.pace.tell = lambda seconds: tqdm.write(estimate_line(run, seconds))
        run.board = open_board(run)
    warmed = time.perf_counter()
    if warm_up(run) and run.is_main:
        print(f"warm-up  {time.perf_counter() - warmed:.1f} s: kernels chosen for every batch shape before epoch "
              f"{run.start_epoch}")
    epoch = run.start_epoch
    try:
        while not at_end(run.scheduler):
            try:
                if not train_and_validate(run, epoch):
                    return end_stopped_run(run, epoch)
            except TrainingDiverged as error:
                diverged(run, epoch, error)
                raise
            epoch += 1
        finish(run)
    finally:
        run.runtime.pace.tell = None  # its closure holds the run: a cycle that would keep the model until a gc pass


def train_and_validate(run: Run, epoch: int) -> bool:
    """One epoch: train (to its end or the planned last step), agree on what comes next, validate when due, log
    and checkpoint; after a budget's measured epoch, plan. False when a stop cut the epoch short."""
    runtime, settings = run.runtime, run.settings
    started = time.perf_counter()
    if runtime.budget is not None:
        runtime.budget.begin_epoch()
    images_per_step = settings.data.batch_size * settings.optim.accum_steps
    run.train_loader.sampler.set_epoch(epoch, skip=run.progress.steps * images_per_step)
    finished = train_one_epoch(run.model, run.train_loader, run.optimizer, run.scheduler, run.scaler,
                               run.loss_fn, runtime, epoch, run.progress)
    trained = time.perf_counter()
    run.progress.train_seconds += trained - started
    if not finished or not agree_at_epoch_end(run, epoch):
        return False
    final, measuring = at_end(run.scheduler), runtime.budget is not None and not runtime.budget.planned
    metrics = validate(run) if final or measuring or run.cadence.due(epoch) else None
    val_seconds = time.perf_counter() - trained
    if metrics is not None:
        run.cadence.measured(run.progress.train_seconds, val_seconds)
        if runtime.budget is not None:
            runtime.budget.measured(val=val_seconds)
            runtime.budget.eval_every = run.cadence.every
    runtime.pace.maybe_tell()  # an epoch shorter than the first few steps
    end_of_epoch(run, epoch, metrics, val_seconds, final)
    if measuring:
        plan_after_measured_epoch(run, epoch)
    return True


def plan_after_measured_epoch(run: Run, epoch: int) -> None:
    """After a budget's measured epoch: rank 0 plans the last step, every rank takes it (or the refusal: -1)
    and the plan is said in one line."""
    runtime, step, too_small = run.runtime, run.scheduler.last_epoch, None
    total = -1
    if run.is_main:
        try:
            total = runtime.budget.first_plan(step)
        except BudgetTooSmall as error:
            too_small = error
    _, (total,) = devices.agree(runtime.device, runtime.dist, [], [total])
    if total < 0:
        if run.is_main:
            write_results(run, str(too_small), epoch)
        raise too_small or BudgetTooSmall("--time-budget: too short for a second epoch (rank 0 names the budget)")
    follow_plan(runtime, run.scheduler, step, total)
    if run.is_main:
        print(plan_line(run))


def end_stopped_run(run: Run, epoch: int) -> None:
    """After an agreed stop (a signal, or a budget whose measured epoch did not fit): save the partial epoch
    and a complete folder (rank 0) and say how to go on; a budget too small for its measured epoch is a
    BudgetTooSmall on every rank."""
    runtime, progress, accum = run.runtime, run.progress, run.settings.optim.accum_steps
    (progress.loss_sum, progress.count), _ = devices.agree(
        runtime.device, runtime.dist, [progress.loss_sum, progress.count], [])  # the partial epoch of every rank
    batches = f" ({progress.steps * accum} batches)" if accum > 1 else ""
    reason = runtime.stop_flag.signal_name
    where = f"stopped in epoch {epoch} after step {progress.steps}{batches}"
    if run.is_main:
        save(run, epoch - 1)
    if reason == "time budget":  # only before the first plan: after it the deadline moves the plan's end
        budget = runtime.budget
        training = budget.clock() - budget.epoch_started
        epoch_seconds = training / max(1, runtime.pace.steps) * run.schedule.steps_per_epoch
        smallest = (budget.spent() - training + 2.2 * epoch_seconds) / (1 - GUESSED_WRITE - 0.01)
        error = BudgetTooSmall(f"--time-budget {format_duration(budget.seconds)}: the first epoch did not fit "
                               f"({where}); the smallest budget that works here is about {format_duration(smallest)}")
        if run.is_main:
            write_results(run, str(error), epoch)
        raise error
    if run.is_main:
        write_results(run, f"{reason}: {where}", epoch)
        last = run.settings.run.out / "last.pth"
        print(f"{reason}: {where}; saved {last}. Resume with the same command plus --resume.")
        print(end_block(run))


def diverged(run: Run, epoch: int, error: Exception) -> None:
    """NaN/inf loss, agreed by every rank: keep the last good last.pth, write a pending better best.pth, curves,
    samples of the last good weights and results.json (rank 0)."""
    if not run.is_main:
        return
    folder, model, out = run.folder, run.inference_model(), run.settings.run.out
    good = folder.best["model"] if folder.best is not None else None
    folder.write_best()
    if good is None and (out / "best.pth").is_file():
        good = load_checkpoint(out / "best.pth")["model"]
    try:
        if good is not None:
            model.load_state_dict(good)
    except RuntimeError:  # a best.pth of another model left in the folder: no samples rather than wrong ones
        good = None
    if run.history:
        plot_curves(run.history, out / "curves.png")
    if good is not None:
        write_samples(*val_samples(run), run.table, out / "val_samples.png")
    write_results(run, f"diverged: {error}", epoch)


def finish(run: Run) -> None:
    """results.json of a completed run and what to do next (rank 0)."""
    if not run.is_main:
        return
    if not run.history or run.history[-1]["epoch"] < run.start_epoch:  # nothing was left to train
        last = run.settings.run.out / "last.pth"
        print(f"{last} already has {len(run.history)} epochs; raise --epochs to train more")
        return
    write_results(run)
    print(end_block(run))


def stop_workers(loader: DataLoader) -> None:
    """Shut persistent workers down now, through the DataLoader's own sentinel path: left to interpreter exit,
    multiprocessing would SIGTERM them, which they ignore (devices.ignore_stop_signals), and wait forever."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def run_to_the_end(run: Run) -> None:
    """fit() the run, then release what it holds: loader workers, a checkpoint write still under way (on the disk
    before the process ends), TensorBoard, the process group."""
    try:
        fit(run)
    finally:
        for loader in (run.train_loader, run.val_loader):
            stop_workers(loader)
        run.folder.wait()
        if run.board is not None:
            run.board.close()
        if run.runtime.dist.enabled:
            torch.distributed.destroy_process_group()
