"""What decides where a run goes next, taken once for every process: stop requests, a divergence, and the time
budget's plan, agreed at the same step by every rank."""
from __future__ import annotations

import math

import torch

import devices
from engine.run import EpochProgress, Run, Runtime
from engine.schedule import at_end, replan, schedule_of


class TrainingDiverged(Exception):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


def decide_after_step(runtime: Runtime, scheduler, loss_sum: torch.Tensor, progress: EpochProgress, epoch: int,
                      bar) -> bool:
    """After an optimizer step: at every --log-every steps check and show the loss (the loop's only host sync);
    at the agreement points (every step in one process, every --log-every steps under torchrun) take the ranks'
    one decision: a stop, a divergence, rank 0's plan. True: this epoch's training ends here."""
    step, logging = scheduler.last_epoch, progress.steps % runtime.log_every == 0
    runtime.pace.step_done()
    if runtime.budget is not None:
        runtime.budget.step_done()
    if runtime.dist.enabled and not logging:
        return False
    finite = True
    if logging:
        loss = loss_sum.item()
        finite = math.isfinite(loss)
        bar.set_postfix(loss=f"{loss / progress.count:.4f}")
        runtime.pace.maybe_tell()
    total = schedule_of(scheduler).total
    if runtime.budget is not None and runtime.dist.is_main:
        wait = runtime.log_every if runtime.dist.enabled else 0
        total, deadline = runtime.budget.in_epoch(step, epoch, logging, wait)
        if deadline:
            runtime.stop_flag.request("time budget")
    (stops, nonfinite), (total,) = devices.agree(runtime.device, runtime.dist, [runtime.stop_flag.requested, not finite],
                                                 [last_step_code(total)])
    if nonfinite:
        raise TrainingDiverged(f"loss became NaN/inf in epoch {epoch} by step {progress.steps}")
    if runtime.stop_flag.agreed(stops > 0):
        return True
    follow_plan(runtime, scheduler, step, total)
    return at_end(scheduler)


def last_step_code(total: int | None) -> float:
    """A planned last step as a number every rank can sum (-1: not planned yet)."""
    return -1.0 if total is None else float(total)


def follow_plan(runtime: Runtime, scheduler, step: int, code: float) -> None:
    """Take the agreed last step (rank 0's plan): the budget records it, the schedule re-plans from `step`,
    and the next step runs at the re-planned rate."""
    if runtime.budget is None or code < 0 or not runtime.budget.follow(int(code), step):
        return
    replan(scheduler, int(code), step)


def agree_at_epoch_end(run: Run, epoch: int) -> bool:
    """The ranks' one decision when an epoch's training ends: the train loss summed over the ranks (history
    holds the mean of all of them), a divergence, a stop, rank 0's plan. False: stop here."""
    runtime, step, progress = run.runtime, run.scheduler.last_epoch, run.progress
    total = run.schedule.total
    if runtime.budget is not None and runtime.dist.is_main:
        total, deadline = runtime.budget.at_epoch_end(step, epoch)
        if deadline:
            runtime.stop_flag.request("time budget")
    everyone = [runtime.stop_flag.requested, progress.loss_sum, progress.count]
    (stops, loss_sum, count), (total,) = devices.agree(runtime.device, runtime.dist, everyone, [last_step_code(total)])
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(f"loss became NaN/inf in epoch {epoch} by step {progress.steps}")
    if runtime.stop_flag.agreed(stops > 0):
        return False  # each rank keeps its own sums: end_stopped_run() adds them up once
    progress.loss_sum, progress.count = loss_sum, int(count)
    follow_plan(runtime, run.scheduler, step, total)
    return True
