"""The learning-rate schedule of every run: a linear warm-up, then poly or step decay, per optimizer step; a
time budget re-plans its last step as the run goes (engine/budget.py decides where)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.settings import OptimSettings

WARMUP_SHARE = 10  # a budgeted run's warm-up takes at most 1/10 of its epochs (but 2 when it had 2 or more)


@dataclass
class Schedule:
    """The lr factor of each optimizer step (LambdaLR's lambda): a linear ramp to 1 at `warm_end`, then poly
    (power 0.9) from `decay_from` at `decay_start` to 0 at `total`, or step decay (x gamma every step_size
    epochs). Plainly that is a warm-up of warmup_epochs from 0 and a decay from 1 to 0 at the last epoch's end.

    A budgeted run starts provisional (`total` None: the warm-up, then a constant rate); replan() sets the last
    step and re-anchors the ramp or the decay at the rate reached, so the lr never jumps. Plain fields only:
    LambdaLR saves them in its state_dict, so last.pth keeps the plan."""

    kind: str
    steps_per_epoch: int
    epochs: int
    warmup_epochs: int
    gamma: float = 0.5
    step_size: int = 50
    total: int | None = -1  # the last step (-1: epochs x steps_per_epoch; None: not planned yet)
    ramp_start: int = 0  # the ramp runs from ramp_from, the factor before this step, to 1 at warm_end
    ramp_from: float = 0.0
    warm_end: int = -1  # -1: warmup_epochs x steps_per_epoch
    decay_start: int = -1  # -1: warm_end
    decay_from: float = 1.0

    def __post_init__(self) -> None:
        if self.total == -1:
            self.total = self.epochs * self.steps_per_epoch
        if self.warm_end == -1:
            self.warm_end = self.warmup_epochs * self.steps_per_epoch
        if self.decay_start == -1:
            self.decay_start = self.warm_end

    def __call__(self, step: int) -> float:
        if step < self.warm_end:
            return self.ramp_from + (1 - self.ramp_from) * (step + 1 - self.ramp_start) / (self.warm_end - self.ramp_start)
        if self.kind == "step":
            return self.gamma ** (step // (self.step_size * self.steps_per_epoch))
        if self.total is None or self.total <= self.decay_start:  # provisional, or no step left to decay
            return self.decay_from
        if step >= self.total:
            return 0.0
        return self.decay_from * (1 - (step - self.decay_start) / (self.total - self.decay_start)) ** 0.9

    def replan(self, total: int, step: int) -> None:
        """End at `total` from `step` on. The first plan shrinks a warm-up of 2 or more epochs to about a tenth of
        the planned epochs (at least 2, fewer than the run); a ramp under way goes on from the factor it reached,
        a decay from the factor of `step` (for poly an unchanged end keeps every factor)."""
        epochs = max(1, math.ceil(total / self.steps_per_epoch))
        warm_end = self.warm_end
        if self.total is None:  # the first plan
            if self.warmup_epochs >= 2:
                self.warmup_epochs = max(1, min(self.warmup_epochs, max(2, epochs // WARMUP_SHARE), epochs - 1))
            warm_end = self.warmup_epochs * self.steps_per_epoch
        warm_end = min(warm_end, total - 1)
        if step < warm_end:
            self.ramp_from, self.ramp_start = self(step - 1) if step else 0.0, step
            self.warm_end, self.decay_start, self.decay_from = warm_end, warm_end, 1.0
        else:  # an end at `step` itself: the rate is 0 from there
            self.decay_from, self.decay_start = self(step) if total > step else 0.0, step
            self.warm_end = min(self.warm_end, step)
        self.total, self.epochs = total, epochs


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSettings, steps_per_epoch: int,
                    budgeted: bool) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR over a Schedule (schedule_of(scheduler)): linear warm-up, then poly or step decay;
    `budgeted` (--time-budget): provisional until the measured epoch plans the last step."""
    plan = Schedule(optim.schedule, steps_per_epoch, optim.epochs, optim.warmup_epochs, optim.gamma, optim.step_size,
                    total=None if budgeted else -1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, plan)


def schedule_of(scheduler: torch.optim.lr_scheduler.LambdaLR) -> Schedule:
    """The Schedule that drives a scheduler built by build_scheduler."""
    return scheduler.lr_lambdas[0]


def replan(scheduler: torch.optim.lr_scheduler.LambdaLR, total: int, step: int) -> None:
    """End the schedule at step `total`, re-planned from `step` (the last step taken): the next optimizer step
    runs at the re-planned rate. Stepping the scheduler again from `step` - 1 sets every group's lr, and what
    get_last_lr() reports, from the new plan."""
    schedule_of(scheduler).replan(total, step)
    scheduler.last_epoch = step - 1
    scheduler.step()


def at_end(scheduler: torch.optim.lr_scheduler.LambdaLR) -> bool:
    """Whether the schedule's last step is done (never while a budget measures its first epoch)."""
    total = schedule_of(scheduler).total
    return total is not None and scheduler.last_epoch >= total
