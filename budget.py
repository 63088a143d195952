"""`train.py --time-budget`: the learning-rate schedule, and how many epochs fit in the time a run is given.

A budgeted run trains its first epoch as the measurement (warm-up rate, then validation and a checkpoint),
then fixes the epoch count that fits the time left and re-plans the rest of the schedule from that step on,
so warm-up and decay still complete at the run's last step (Li, Yumer & Ramanan, "Budgeted Training",
ICLR 2020: a schedule that decays to zero at the budget beats a longer one cut short)."""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import run_folder
from cfg import UserError

if TYPE_CHECKING:
    from train import Run

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)")
WARMUP_SHARE = 10  # a budgeted run's warm-up takes at most 1/10 of its epochs (but 2 when it had 2 or more)


def parse_duration(text: str) -> float:
    """'90s', '20m', '1.5h' or plain seconds -> seconds."""
    match = DURATION.fullmatch(str(text).strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--time-budget {text}: expected a positive duration such as 90s, 20m, 1.5h or 600")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """Seconds as the shortest of 45s / 12.5m / 1.5h, rounded up so it is never less than the value."""
    if seconds < 120:
        return f"{math.ceil(seconds)}s"
    if seconds < 2 * 3600:
        return f"{math.ceil(seconds / 6) / 10:g}m"
    return f"{math.ceil(seconds / 360) / 10:g}h"


def process_age() -> float:
    """Seconds since this process started, imports included (Linux /proc; elsewhere 0, from the call)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Schedule:
    """The lr factor of each optimizer step (LambdaLR's lambda): linear warm-up, then poly (power 0.9) to 0 at
    the last step, or step decay (x gamma every step_size epochs).

    A budgeted run starts provisional (`replanned_at` past every step): the warm-up of `provisional_warmup`
    epochs, then a constant rate. replan() fixes the epoch count at the step it is called; from there the
    warm-up ramps on without a jump to the end of `warmup_epochs` and the decay ends at the last step.
    Plain fields only: LambdaLR saves them in its state_dict, so last.pth keeps the plan."""

    kind: str
    steps_per_epoch: int
    epochs: int
    warmup_epochs: int
    gamma: float = 0.5
    step_size: int = 50
    provisional_warmup: int = 0
    replanned_at: int = 0

    @classmethod
    def provisional(cls, kind: str, steps_per_epoch: int, max_epochs: int, warmup_epochs: int, gamma: float,
                    step_size: int) -> "Schedule":
        """A budgeted run's schedule before its epoch count is known."""
        return cls(kind, steps_per_epoch, max_epochs, warmup_epochs, gamma, step_size, warmup_epochs,
                   max_epochs * steps_per_epoch + 1)

    def ramp(self, steps: int) -> float:
        """The provisional warm-up's factor after `steps` steps."""
        return min(1.0, steps / (self.provisional_warmup * self.steps_per_epoch)) if self.provisional_warmup else 1.0

    def __call__(self, step: int) -> float:
        per_epoch, replanned = self.steps_per_epoch, self.replanned_at
        if step < replanned:  # before the epoch count was known (budgeted runs only)
            return self.ramp(step + 1)
        warm_end = max(self.warmup_epochs * per_epoch, replanned)
        if step < warm_end:
            start = self.ramp(replanned) if replanned else 0.0
            return start + (1 - start) * (step + 1 - replanned) / (warm_end - replanned)
        if self.kind == "poly":
            return max(0.0, 1 - (step - warm_end) / max(1, self.epochs * per_epoch - warm_end)) ** 0.9
        return self.gamma ** (step // (self.step_size * per_epoch))

    def replan(self, epochs: int, step: int) -> None:
        """Fix the epoch count at `step`; a warm-up of 2 or more epochs shrinks to about 1/10 of them (at least 2,
        so the ramp goes on from where the measured epoch left it, and fewer than `epochs`)."""
        if self.warmup_epochs >= 2:
            self.warmup_epochs = max(1, min(self.warmup_epochs, max(2, epochs // WARMUP_SHARE), epochs - 1))
        self.epochs, self.replanned_at = epochs, step


@dataclass
class EpochCost:
    """The steady cost of one epoch as measured on the first: training, one validation, one checkpoint write."""

    train: float
    val: float
    save: float


@dataclass
class Budget:
    """A run's time budget: when it ends, what the first epoch cost, and the epoch count chosen from that."""

    seconds: float
    started: float  # time.monotonic() at the process start
    spent_before: float = 0.0  # seconds spent by the runs this one resumes
    epochs: int | None = None  # chosen after the first epoch
    cost: EpochCost | None = None

    @classmethod
    def start(cls, seconds: float, saved: dict | None = None) -> "Budget":
        """The clock starts with the process; a resumed run counts the time its predecessors spent."""
        budget = cls(seconds, time.monotonic() - process_age())
        if saved:
            budget.spent_before, budget.epochs = saved["spent"], saved["epochs"]
            budget.cost = EpochCost(**saved["cost"]) if saved.get("cost") else None
        return budget

    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.spent()

    def margin(self) -> float:
        """Kept free at the end: process exit and timing noise."""
        return max(1.0, 0.02 * self.seconds)

    def stop_reserve(self) -> float:
        """What a clean stop needs before the deadline: a checkpoint write (a guess until one was timed)."""
        return self.margin() + (1.5 * self.cost.save if self.cost else 0.05 * self.seconds)

    def must_stop(self) -> bool:
        """True once only a clean stop still fits."""
        return self.left() < self.stop_reserve()

    def state(self) -> dict:
        """What last.pth keeps: the choice and the time spent, so --resume continues the same schedule."""
        return {"seconds": self.seconds, "spent": self.spent(), "epochs": self.epochs,
                "cost": asdict(self.cost) if self.cost else None}


def time_needed(epochs: int, cost: EpochCost, eval_every: int, save_every: float, first: int = 2) -> float:
    """Seconds that epochs first..first+epochs-1 take: training, validation at the cadence and always at
    the last, checkpoints at the --save-every cadence and always at the end."""
    last = first + epochs - 1
    validations = last // eval_every - (first - 1) // eval_every + (last % eval_every != 0)
    work = epochs * cost.train + validations * cost.val
    saves = epochs if save_every <= 0 else math.floor(work / save_every) + 1
    return work + saves * cost.save


def choose_epochs(budget: Budget, cost: EpochCost, eval_every: int, save_every: float, max_epochs: int) -> int:
    """The most epochs (the measured one included, at most max_epochs) whose remaining ones fit in what the
    budget has left; fewer than 2 is a BudgetTooSmall naming the smallest budget that would do."""
    available = budget.left() - budget.margin()
    more = 0
    while 1 + more < max_epochs and time_needed(more + 1, cost, eval_every, save_every) <= available:
        more += 1
    if more == 0:  # the measured epoch alone never ends a schedule
        one_more = time_needed(1, cost, eval_every, save_every)
        needed = budget.spent() + one_more
        smallest = max(needed / 0.98, needed + 1.0)  # the inverse of margin()
        raise BudgetTooSmall(f"--time-budget {format_duration(budget.seconds)}: too short for a second epoch "
                             f"(the first took {budget.spent():.0f} s with start-up, one more needs ~{one_more:.0f} s); "
                             f"the smallest budget that works here is about {format_duration(smallest)}")
    return 1 + more


# ---------------------------------------------------------------- the bookkeeping of a budgeted run

def steady_train_seconds(run: Run, started: float, ended: float, steps: int) -> float:
    """An epoch's training time without the one-off start-up: the steps after this process's first one,
    scaled to the whole epoch (the whole time when the epoch had a single step)."""
    first = run.loop.first_step_end
    if first is None or first <= started or steps < 2:
        return ended - started
    return (ended - first) * run.schedule.steps_per_epoch / (steps - 1)


def plan(run: Run, cost: EpochCost) -> None:
    """Fix the epoch count from the measured epoch (rank 0 decides, every rank follows), re-plan the schedule
    from this step on, and say so in one line."""
    args, budget = run.args, run.budget
    epochs, too_small = 0, None
    if run.loop.dist.is_main:
        try:
            epochs = choose_epochs(budget, cost, args.eval_every, args.save_every, args.epochs)
        except BudgetTooSmall as error:
            too_small = error
    if run.loop.dist.enabled:  # every rank takes rank 0's choice, or its refusal (0)
        choice = torch.full((1,), epochs, device=run.loop.device, dtype=torch.int64)
        torch.distributed.broadcast(choice, src=0)
        epochs = int(choice.item())
    if epochs == 0:
        if run.loop.dist.is_main:
            run_folder.write_results(run, str(too_small), run.history[-1]["epoch"])
        raise too_small or BudgetTooSmall("--time-budget: too short for a second epoch (rank 0 names the budget)")
    budget.epochs, budget.cost = epochs, cost
    run.schedule.replan(epochs, run.scheduler.last_epoch)
    args.epochs, args.warmup_epochs = epochs, run.schedule.warmup_epochs
    for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs):  # the next step's rate, re-planned
        group["lr"] = base * run.schedule(run.scheduler.last_epoch)
    run.scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    if run.loop.dist.is_main:
        per_epoch = time_needed(epochs - 1, cost, args.eval_every, args.save_every) / (epochs - 1)
        print(f"time budget {format_duration(budget.seconds)}: {epochs} epochs of ~{per_epoch:.1f} s "
              f"(train {cost.train:.1f} s, val {cost.val:.1f} s every {args.eval_every}, checkpoint {cost.save:.1f} s; "
              f"{budget.spent():.0f} s spent), warm-up {run.schedule.warmup_epochs}")


def out_of_time_for_validation(run: Run) -> bool:
    """Whether the deadline leaves no room to validate this epoch and save: then stop cleanly instead."""
    budget = run.budget
    if budget is None or budget.cost is None or not budget.left() < budget.cost.val + budget.stop_reserve():
        return False
    run.loop.stop.request("time budget")
    return True


class BudgetTooSmall(UserError):
    """The budget cannot fit the measured epoch plus one more."""
