"""Simulate `train.py --time-budget` runs: for budgets x cost models, the share of the budget used and whether
the run completed (its last epoch validated and saved, the lr at 0 at its last step, within the budget).

    python tools/budget_sim.py                      # 10 to 30 minutes, every minute
    python tools/budget_sim.py --step 7 --seeds 3   # 172 budgets, 3 random draws each

A simulated clock drives engine.budget.Budget, engine.schedule.Schedule and engine.checkpoints.Folder's checkpoint cadence, the objects
train.py drives, in the order train.py calls them; only the seconds are made up. Cost models: CPU-like (the
quarter-resolution CPU recipe: 46 steps of ~0.76 s, validation 3 s every second epoch, a small checkpoint) and
GPU-like (an epoch of 2 s, validation 0.5 s, a 3 s checkpoint), each steady, wandering +-20 % from epoch to
epoch, and drifting +30 % after the first epoch; every first epoch also pays one-off costs (start-up, kernel
selection) of 30 %.
"""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.budget import Budget, BudgetTooSmall  # noqa: E402
from engine.schedule import Schedule  # noqa: E402
from engine.checkpoints import Folder  # noqa: E402


@dataclass(frozen=True)
class Costs:
    """A made-up machine: seconds of start-up, per step, per validation, per checkpoint write, and how epochs vary."""

    name: str
    steps: int  # optimizer steps an epoch
    step: float
    val: float
    save: float
    eval_every: int
    start: float = 10.0  # interpreter, imports, data, model: before the first step
    first: float = 1.3  # the first epoch's steps are this much slower (one-off kernel selection, warm-up)
    wander: float = 0.0  # each later epoch's pace is drawn from 1 +- wander
    drift: float = 1.0  # every epoch after the first runs this much slower

    def pace(self, epoch: int, rng: random.Random) -> float:
        """Seconds per step in `epoch`."""
        if epoch == 1:
            return self.step * self.first
        return self.step * self.drift * (1 + rng.uniform(-self.wander, self.wander))


CPU = Costs("cpu", steps=46, step=0.76, val=3.0, save=0.6, eval_every=2)
GPU = Costs("gpu", steps=46, step=2.0 / 46, val=0.5, save=3.0, eval_every=1, start=20.0)
MODELS = [model for base in (CPU, GPU) for model in (
    base, Costs(**{**vars(base), "name": base.name + " +-20%", "wander": 0.2}),
    Costs(**{**vars(base), "name": base.name + " +30% after 1", "drift": 1.3}))]


class Clock:
    """Simulated seconds since the process started."""

    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class Outcome:
    """How a simulated run ended."""

    used: float  # share of the budget spent when the process ends
    completed: bool  # ended at its planned last step, validated and saved, within the budget
    epochs: int
    replans: int
    final_lr: float  # the schedule's factor after the last step
    detail: str = ""
    cuts: int = 0  # times the deadline moved the end to the step it came at (steps slower than planned)


def simulate(seconds: float, costs: Costs, seed: int = 0, max_epochs: int = 100000, warmup: int = 2,
             save_every: float = 300.0, log_every: int = 10, exit_seconds: float = 0.5) -> Outcome:
    """One budgeted run, step by step, as train.py runs it (one process)."""
    rng, clock = random.Random(seed), Clock(costs.start)
    budget = Budget.start(seconds, costs.steps, max_epochs * costs.steps, costs.eval_every, save_every,
                          clock=clock, age=clock)
    schedule = Schedule("poly", costs.steps, max_epochs, warmup, total=None)
    folder = Folder(Path("."), writes=False, save_every=save_every, clock=clock)
    folder.prepare([])
    step, epoch = 0, 1

    def outcome(completed: bool, detail: str) -> Outcome:
        return Outcome(clock.now / seconds, completed, epoch, len(budget.replans), schedule(step), detail, budget.cuts)
    while not (schedule.total is not None and step >= schedule.total):
        step, stopped = train_epoch(budget, schedule, clock, costs.pace(epoch, rng), step, epoch, costs.steps,
                                    log_every)
        total, stop = budget.at_epoch_end(step, epoch)  # agree_at_epoch_end
        if stopped or stop:
            return outcome(False, "deadline in the measured epoch")
        follow(budget, schedule, total, step)
        final, measuring = schedule.total is not None and step >= schedule.total, not budget.planned
        validated = final or measuring or epoch % costs.eval_every == 0
        if validated:  # train_and_validate
            clock.now += costs.val
            budget.measured(val=costs.val)
        if folder.due(validated, final or measuring):  # end_of_epoch
            clock.now += costs.save
            budget.measured(save=costs.save)
            folder.wrote(epoch)
        if measuring:  # first_plan
            try:
                follow(budget, schedule, budget.first_plan(step), step)
            except BudgetTooSmall as error:
                return outcome(False, str(error))
        epoch += 1
    epoch -= 1
    clock.now += exit_seconds
    return outcome(clock.now <= seconds, "" if clock.now <= seconds else "over the budget")


def train_epoch(budget: Budget, schedule: Schedule, clock: Clock, pace: float, step: int, epoch: int, steps: int,
                log_every: int) -> tuple[int, bool]:
    """train_one_epoch and decide_after_step: the global step reached, and whether the run stopped."""
    budget.begin_epoch()
    for done in range(1, steps + 1):
        clock.now += pace
        step += 1
        budget.step_done()
        total, stop = budget.in_epoch(step, epoch, done % log_every == 0)
        if stop:
            return step, True
        follow(budget, schedule, total, step)
        if schedule.total is not None and step >= schedule.total:
            break
    return step, False


def follow(budget: Budget, schedule: Schedule, total: int | None, step: int) -> None:
    """What train.follow_plan does with an agreed plan."""
    if total is not None and budget.follow(total, step):
        schedule.replan(total, step)


def table(budgets: list[float], seeds: int) -> list[str]:
    """Markdown rows: per cost model, the least and mean share used and how many runs completed."""
    lines = ["| costs | budgets | runs | completed | share used: least | mean | re-plans (mean) | cut by the deadline |",
             "|---|---|---|---|---|---|---|---|"]
    for costs in MODELS:
        outcomes = [simulate(seconds, costs, seed) for seconds in budgets for seed in range(seeds)]
        used = [outcome.used for outcome in outcomes]
        lines.append(f"| {costs.name} | {budgets[0] / 60:g}-{budgets[-1] / 60:g} min | {len(outcomes)} | "
                     f"{sum(o.completed for o in outcomes)} | {100 * min(used):.1f} % | "
                     f"{100 * sum(used) / len(used):.1f} % | {sum(o.replans for o in outcomes) / len(outcomes):.0f} | "
                     f"{sum(o.cuts > 0 for o in outcomes)} |")
    return lines


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Simulate --time-budget runs on made-up costs.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--first", type=float, default=10, help="smallest budget, minutes")
    parser.add_argument("--last", type=float, default=30, help="largest budget, minutes")
    parser.add_argument("--step", type=float, default=60, help="seconds between budgets")
    parser.add_argument("--seeds", type=int, default=1, help="random draws per budget (wandering epochs)")
    return parser


def main(args: argparse.Namespace) -> None:
    count = int(round((args.last - args.first) * 60 / args.step)) + 1
    budgets = [args.first * 60 + index * args.step for index in range(count)]
    print("\n".join(table(budgets, args.seeds)))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
