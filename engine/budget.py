"""`train.py --time-budget`: the learning-rate schedule, and how many optimizer steps fit in the time a run is given.

A budgeted run trains its first epoch as the measurement (warm-up rate, then validation and a checkpoint),
then plans its last optimizer step from what that epoch cost. It plans again after every epoch from the
latest costs, and within the epoch where the plan ends at every --log-every step, so epochs that run faster
or slower than the first are absorbed; the last epoch may end part-way. Every plan lays the rest of the
schedule out from the rate reached to 0 at the new last step (Li, Yumer & Ramanan, "Budgeted Training",
ICLR 2020: a schedule that decays to zero at the budget beats a longer one cut short).

The Budget reads time only through its clock, so tools/budget_sim.py and tests/test_budget.py drive the code
train.py drives with simulated costs."""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from cfg import UserError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)")
GUESSED_WRITE = 0.05  # share of the budget kept for the first checkpoint write and validation, until measured


def parse_duration(text: str) -> float:
    """'90s', '20m', '1.5h' or plain seconds -> seconds."""
    match = DURATION.fullmatch(str(text).strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--time-budget {text}: expected a positive duration such as 90s, 20m, 1.5h or 600")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """Seconds as the shortest of 45s / 12.5m / 1.5h / 2.5d, rounded up so it is never less than the value."""
    if seconds < 120:
        return f"{math.ceil(seconds)}s"
    if seconds < 2 * 3600:
        return f"{math.ceil(seconds / 6) / 10:g}m"
    if seconds < 48 * 3600:
        return f"{math.ceil(seconds / 360) / 10:g}h"
    return f"{math.ceil(seconds / 8640) / 10:g}d"


def process_age() -> float:
    """Seconds since this process started, imports included (Linux /proc; elsewhere 0, from the call)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Costs:
    """What the run has measured: seconds per optimizer step (steady, of the latest epoch), one validation,
    one checkpoint write (last.pth, a pending best.pth, the plots)."""

    step: float
    val: float
    save: float


@dataclass
class Budget:
    """A run's time budget and its plan: the last optimizer step that fits, re-planned as costs come in.

    One reserve rule serves the plan and the deadline: the margin, one checkpoint write, and a validation
    when one is due. Rank 0 owns the Budget's decisions under torchrun; train.py shares them."""

    seconds: float
    steps_per_epoch: int
    max_steps: int  # --epochs x steps per epoch: no plan goes past it
    eval_every: int = 1
    save_every: float = 300.0
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0  # clock() at the process start
    spent_before: float = 0.0  # seconds spent by the runs this one resumes
    total: int | None = None  # the planned last step; None until the measured epoch has ended
    costs: Costs | None = None
    replans: list[list[int]] = field(default_factory=list)  # [step, total] of every plan that moved the end
    epoch_started: float = 0.0
    epoch_steps: int = 0  # optimizer steps this process ran in the epoch under way
    first_step_end: float | None = None  # the process's first step: what came before it is one-off
    saved_at: float = 0.0  # clock() of the last checkpoint write
    cuts: int = 0  # times the deadline, not a plan, ended the run: steps ran slower than planned

    @classmethod
    def start(cls, seconds: float, steps_per_epoch: int, max_steps: int, eval_every: int, save_every: float,
              saved: dict | None = None, clock: Callable[[], float] = time.monotonic,
              age: Callable[[], float] | None = None) -> "Budget":
        """The clock starts with the process (`age`: seconds since it started); a resumed run counts the time its
        predecessors spent and keeps their plan and costs."""
        now = clock()
        started = now - (age or process_age)()
        budget = cls(seconds, steps_per_epoch, max_steps, eval_every, save_every, clock, started, saved_at=now)
        if saved:
            budget.spent_before, budget.total = saved["spent"], saved.get("total")
            budget.costs = Costs(**saved["costs"]) if saved.get("costs") else None
            budget.replans = [list(pair) for pair in saved.get("replans", [])]
            budget.cuts = saved.get("deadline_cuts", 0)
        return budget

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started

    def left(self) -> float:
        return self.seconds - self.spent()

    def margin(self) -> float:
        """Kept free at the end: the process's exit and timing noise."""
        return max(1.0, 0.01 * self.seconds)

    def reserve(self, validate: bool) -> float:
        """What the end of a run needs: the margin, a checkpoint write and, when one is due, a validation."""
        if self.costs is None:
            return self.margin() + GUESSED_WRITE * self.seconds
        return self.margin() + self.costs.save + (self.costs.val if validate else 0.0)

    @property
    def planned(self) -> bool:
        return self.total is not None

    # ------------------------------------------------------------ measuring
    def begin_epoch(self) -> None:
        self.epoch_started, self.epoch_steps = self.clock(), 0

    def step_done(self) -> None:
        self.epoch_steps += 1
        if self.first_step_end is None:
            self.first_step_end = self.clock()

    def step_seconds(self) -> float | None:
        """Seconds per step in the epoch under way: after this process's first step when that lies in it
        (start-up, kernel selection and warm-up are one-off), else over all its steps so far."""
        if self.first_step_end is not None and self.first_step_end > self.epoch_started and self.epoch_steps >= 2:
            return (self.clock() - self.first_step_end) / (self.epoch_steps - 1)
        if self.epoch_steps == 0 or self.first_step_end > self.epoch_started:
            return None
        return (self.clock() - self.epoch_started) / self.epoch_steps

    def measured(self, step: float | None = None, val: float | None = None, save: float | None = None) -> None:
        """Take the latest costs; a checkpoint write also restarts the --save-every clock."""
        costs = self.costs or Costs(0.0, 0.0, 0.0)
        self.costs = Costs(step if step is not None else costs.step, val if val is not None else costs.val,
                           save if save is not None else costs.save)
        if save is not None:
            self.saved_at = self.clock()

    # ------------------------------------------------------------ planning
    def needed(self, step: int, more: int, pending: bool) -> float:
        """Seconds that `more` steps from `step` take with the validations and checkpoint writes of the epoch
        ends among them; `pending`: the epoch end at `step` is still to come. The run's last validation and
        write are the reserve's."""
        if more <= 0:
            return 0.0
        per_epoch, every = self.steps_per_epoch, self.eval_every
        first = step // per_epoch + (0 if pending else 1)  # the next epoch end
        last = math.ceil((step + more) / per_epoch) - 1  # the last epoch end before the final one
        ends = max(0, last - first + 1)
        validations = last // every - (first - 1) // every if ends else 0
        work = more * self.costs.step + validations * self.costs.val
        if self.save_every <= 0:
            saves = ends
        else:
            saves = min(ends, int((self.clock() - self.saved_at + work) // self.save_every))
        return work + saves * self.costs.save

    def fit(self, step: int, pending: bool) -> int:
        """The last step that fits: the most steps after `step` (up to max_steps) whose time, plus the reserve
        for the final validation and write, is what the budget has left."""
        available = self.left() - self.reserve(validate=True)
        low, high = 0, max(0, self.max_steps - step)
        while low < high:
            middle = (low + high + 1) // 2
            if self.needed(step, middle, pending) <= available:
                low = middle
            else:
                high = middle - 1
        return step + low

    def follow(self, total: int, step: int) -> bool:
        """Take a plan (rank 0's, on every rank); True when it moved the end."""
        if total == self.total:
            return False
        self.total = total
        self.replans.append([step, total])
        return True

    def first_plan(self, step: int) -> int:
        """After the measured epoch: the last step that fits; less than one more epoch is a BudgetTooSmall
        naming the smallest budget that would do."""
        total = self.fit(step, pending=False)
        if total - step >= min(self.steps_per_epoch, self.max_steps - step) > 0:
            return total
        one_more = self.needed(step, self.steps_per_epoch, False) + self.reserve(validate=True) - self.margin()
        needed = self.spent() + one_more
        smallest = max(needed / 0.99, needed + 1.0)  # the inverse of margin()
        raise BudgetTooSmall(f"--time-budget {format_duration(self.seconds)}: too short for a second epoch "
                             f"(the first took {self.spent():.0f} s with start-up, one more needs ~{one_more:.0f} s); "
                             f"the smallest budget that works here is about {format_duration(smallest)}")

    def in_epoch(self, step: int, epoch: int, replan: bool, wait: int = 0) -> tuple[int | None, bool]:
        """Rank 0 at an agreement point after optimizer step `step`: the planned last step and whether to stop.
        In the epoch where the plan ends, at the --log-every steps (`replan`), the end is planned again from
        this epoch's pace; once only the reserve is left (before the next agreement, `wait` steps away) the
        end moves to this step. Before the first plan only a stop is possible: the measured epoch did not fit."""
        if not self.planned:
            return None, self.left() < self.reserve(validate=True)
        total, rate = self.total, self.step_seconds()
        if replan and rate is not None and step < total <= epoch * self.steps_per_epoch:
            self.measured(step=rate)
            total = self.fit(step, pending=False)
        if step < total and self.left() < self.reserve(validate=True) + wait * self.costs.step:
            total, self.cuts = step, self.cuts + 1
        return total, False

    def at_epoch_end(self, step: int, epoch: int) -> tuple[int | None, bool]:
        """Rank 0 when an epoch's training ends, before its validation: the planned last step (planned again
        from this epoch's pace) and whether to stop (the measured epoch did not fit its validation and write)."""
        rate = self.step_seconds()
        if rate is not None:
            self.measured(step=rate)
        if not self.planned:
            return None, self.left() < self.reserve(validate=True)
        return (self.fit(step, pending=True) if step < self.total else self.total), False

    def state(self) -> dict:
        """What last.pth and results.json keep: the plan, its re-plans, the costs and the time spent."""
        return {"seconds": self.seconds, "spent": round(self.spent(), 1), "total": self.total,
                "costs": {k: round(v, 3) for k, v in asdict(self.costs).items()} if self.costs else None,
                "replans": [list(pair) for pair in self.replans], "deadline_cuts": self.cuts}


class BudgetTooSmall(UserError):
    """The budget cannot fit the measured epoch plus one more."""
