"""--time-budget: durations, the schedule a budget re-plans, the last step it plans and the deadline, simulated
budgets spent and met, a budgeted run that ends in time with its schedule annealed and its folder complete,
and a stopped budgeted run that resumes on its plan."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_dist as fx  # noqa: E402
from conftest import fit_in_process  # noqa: E402

import engine.checkpoints  # noqa: E402
import engine.loop  # noqa: E402
import train  # noqa: E402
from cfg import UserError  # noqa: E402
from engine import budget  # noqa: E402
from engine.budget import Budget, BudgetTooSmall  # noqa: E402
from engine.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from engine.control import TrainingDiverged  # noqa: E402
from engine.schedule import Schedule  # noqa: E402
from engine.step import accumulation_step  # noqa: E402

RUN_FILES = ("last.pth", "best.pth", "history.csv", "curves.png", "val_samples.png", "results.json")


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1.5h", 5400), ("600", 600), (" 2M ", 120)])
def test_durations(text, seconds):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "0", "-3m", "", "m", "1.5.2h"])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(UserError, match="expected a positive duration such as 90s"):
        budget.parse_duration(text)


def factors(schedule: Schedule, first: int = 0) -> list[float]:
    return [schedule(step) for step in range(first, schedule.total + 1)]


def test_the_plain_schedule_warms_up_then_decays_to_zero_at_the_last_step():
    plain = Schedule("poly", 5, 40, 2)
    values = factors(plain)
    assert plain.total == 200 and values[9] == 1.0 and values[-1] == 0.0 < values[-2]
    assert values[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])


def test_a_budget_that_plans_the_plain_end_plans_the_plain_schedule():
    """Warm-up short enough to keep: the re-planned factors are the plain schedule's, step for step."""
    plain = Schedule("poly", 5, 40, 2)
    planned = Schedule("poly", 5, 300, 2, total=None)
    before = [planned(step) for step in range(5)]
    planned.replan(200, step=5)
    assert planned.warmup_epochs == 2 and planned.epochs == 40
    assert before + factors(planned, 5) == pytest.approx(factors(plain), abs=1e-12)


@pytest.mark.parametrize("epochs, warmup", [(12, 2), (30, 3), (100, 5), (3, 2), (2, 1)])
def test_a_budget_shrinks_the_warm_up_to_its_share_without_a_jump(epochs, warmup):
    """5 warm-up epochs asked for, `epochs` planned after the first: the warm-up becomes about a tenth of them
    (at least 2 where the ramp can go on, fewer than the run), rises without a jump and the decay ends at 0."""
    per_epoch = 4
    schedule = Schedule("poly", per_epoch, 300, 5, total=None)
    before = [schedule(step) for step in range(per_epoch)]
    schedule.replan(epochs * per_epoch, step=per_epoch)
    values = before + factors(schedule, per_epoch)
    assert schedule.warmup_epochs == warmup
    ramp = values[:warmup * per_epoch]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    if warmup > 1:
        assert max(ramp) == pytest.approx(1.0)
        steepest = max(b - a for a, b in zip(ramp, ramp[1:]))
        assert steepest <= 1 / per_epoch + 1e-9  # continuous: no step larger than one epoch's rise
    else:  # a 2-epoch run: the warm-up ends with the measured epoch, the second decays from the rate it reached
        assert values[per_epoch] == pytest.approx(before[-1] + 1 / 20) and values[per_epoch + 1] < values[per_epoch]
    assert values[-1] == 0.0 and values[-2] > 0


def test_without_warm_up_the_measured_epoch_runs_at_the_full_rate():
    schedule = Schedule("poly", 3, 100, 0, total=None)
    assert [schedule(step) for step in range(3)] == [1.0, 1.0, 1.0]
    schedule.replan(30, step=3)
    assert schedule(3) == 1.0 and schedule(29) > 0 and schedule(30) == 0.0


@pytest.mark.parametrize("new_total", [150, 200, 260, 101, 100])
def test_a_re_plan_keeps_the_rate_and_decays_to_zero_at_the_new_end(new_total):
    """Re-planned at step 100 of a poly decay (to end earlier, later, the same, or right now): the rate of step
    100 stays, the decay reaches exactly 0 at the new last step; an unchanged end keeps every factor."""
    schedule, plain = Schedule("poly", 10, 20, 2), Schedule("poly", 10, 20, 2)
    rate = schedule(100)
    schedule.replan(new_total, step=100)
    values = factors(schedule, 100)
    assert schedule.total == new_total and values[-1] == 0.0
    if new_total > 100:
        assert values[0] == rate and all(b < a for a, b in zip(values, values[1:]))
    if new_total == 200:
        assert values == pytest.approx(factors(plain, 100), abs=1e-12)


def test_a_re_plan_in_the_warm_up_continues_the_ramp():
    schedule = Schedule("poly", 10, 50, 5, total=None)
    reached = schedule(19)
    schedule.replan(400, step=20)
    assert schedule.warmup_epochs == 4 and schedule(20) > reached and schedule(39) == 1.0 and schedule(400) == 0.0
    schedule.replan(300, step=30)  # a later re-plan in the ramp: it keeps the warm-up's end
    assert schedule.warm_end == 40 and schedule(39) == 1.0 and schedule(300) == 0.0


class Clock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def planned_budget(seconds: float, spent: float, costs: budget.Costs, eval_every: int = 2, save_every: float = 300,
                   per_epoch: int = 10, max_epochs: int = 1000) -> tuple[Budget, Clock]:
    clock = Clock(spent)
    plan = Budget.start(seconds, per_epoch, max_epochs * per_epoch, eval_every, save_every, clock=clock, age=clock)
    plan.costs = costs
    return plan, clock


def test_the_plan_is_the_last_step_that_fits_with_one_reserve():
    """After the measured epoch: the steps, the validations at their cadence and the checkpoint writes every
    --save-every seconds fit in what is left less the reserve (margin, one write, one validation), one more
    step does not; --epochs stays an upper bound."""
    costs = budget.Costs(step=1.0, val=2.0, save=3.0)
    plan, _ = planned_budget(600, 20, costs)
    total = plan.fit(10, pending=False)
    available = plan.left() - plan.reserve(validate=True)
    assert plan.reserve(validate=True) == plan.margin() + 3.0 + 2.0 == plan.reserve(validate=False) + 2.0
    assert plan.needed(10, total - 10, False) <= available < plan.needed(10, total - 10 + 1, False)
    assert 10 < total < 600
    # 25 steps from step 10 end 3 epochs later (ends at 20, 30: every second epoch validated) with one write
    # (the --save-every 20 s clock passes once); the final epoch's validation and write are the reserve's
    assert planned_budget(600, 20, costs, save_every=20)[0].needed(10, 25, False) == 25 + 2.0 + 3.0
    assert planned_budget(600, 20, costs, max_epochs=3)[0].fit(10, pending=False) == 30


def test_the_deadline_moves_the_end_to_the_step_where_only_the_reserve_is_left():
    costs = budget.Costs(step=1.0, val=2.0, save=3.0)
    plan, clock = planned_budget(600, 20, costs)
    plan.follow(plan.fit(10, pending=False), 10)
    plan.begin_epoch()
    assert plan.in_epoch(11, 2, replan=False) == (plan.total, False)
    clock.now = 600 - plan.reserve(validate=True) + 0.1  # slower than planned
    total, stop = plan.in_epoch(12, 2, replan=False)
    assert (total, stop) == (12, False)  # the run ends here, validated and saved, its lr at 0


def test_a_budget_too_small_names_one_that_works():
    costs = budget.Costs(step=3.0, val=5.0, save=2.0)
    plan, _ = planned_budget(60, 45, costs)
    with pytest.raises(BudgetTooSmall, match="too short for a second epoch") as error:
        plan.first_plan(10)
    suggested = error.value.args[0].rsplit("about ", 1)[1]
    assert planned_budget(budget.parse_duration(suggested), 45, costs)[0].first_plan(10) >= 20


def budget_sim():
    """tools/budget_sim.py, the simulation of a budgeted run on made-up costs."""
    spec = importlib.util.spec_from_file_location("budget_sim", fx.REPO / "tools" / "budget_sim.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
    spec.loader.exec_module(module)
    return module


SIM = budget_sim()


@pytest.mark.parametrize("costs", SIM.MODELS, ids=[costs.name for costs in SIM.MODELS])
def test_simulated_budgets_are_spent_and_met(costs):
    """The planner train.py drives, on a simulated clock: budgets of 10 to 30 minutes with CPU-like and GPU-like
    costs (an epoch of 2 s, validation 0.5 s, a 3 s checkpoint), steady, wandering +-20 % or drifting +30 %:
    every run ends at its planned last step (here the deadline never has to move it), validated and saved,
    lr 0, within the budget, using >= 97 % of it."""
    for seconds in (600, 750, 1000, 1370, 1800):
        outcome = SIM.simulate(seconds, costs, seed=seconds)
        assert outcome.completed and outcome.final_lr == 0.0 and outcome.cuts == 0, (seconds, outcome)
        assert 0.97 <= outcome.used <= 1.0, (seconds, outcome)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 train images: 4 optimizer steps an epoch."""
    return fx.write_camvid(tmp_path_factory.mktemp("budget") / "CamVid", {"train": 8, "val": 2})


def test_a_budgeted_run_ends_in_time_annealed_with_a_complete_folder(data, tmp_path):
    """A 20 s budget for the whole process (interpreter start-up included): it ends within the budget plus 3 s
    (the interpreter's exit and the clock's resolution), its last optimizer step ends the poly schedule (lr 0)
    and the folder holds everything a finished run leaves."""
    seconds, slack = 20, 3.0
    started = time.monotonic()
    result = fx.run([sys.executable, *fx.train_args(data, tmp_path, "--time-budget", f"{seconds}s",
                                                    "--epochs", "1000", "--schedule", "poly", "--warmup-epochs", "3")])
    wall = time.monotonic() - started
    assert wall <= seconds + slack, result.stdout
    decision = [line for line in result.stdout.splitlines() if line.startswith("time budget 20s: ")]
    assert len(decision) == 1, result.stdout
    assert all((tmp_path / name).is_file() for name in RUN_FILES)
    last = fx.load(tmp_path / "last.pth")
    total = last["budget"]["total"]
    assert last["scheduler"]["last_epoch"] == total and last["epoch"] == math.ceil(total / 4)
    rows = fx.read_history(tmp_path / "history.csv")
    assert len(rows) == last["epoch"] >= 3 and float(rows[-1]["lr"]) == 0.0 < float(rows[-2]["lr"])
    assert rows[-1]["val_miou"]  # the last epoch is validated
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["completed"] and results["time_budget"]["total"] == total
    assert results["time_budget"]["replans"][0][0] == 4  # the first plan, after the measured epoch
    assert results["time_budget"]["spent"] <= seconds


def slow_writes(monkeypatch, seconds: float) -> None:
    """Every checkpoint file takes `seconds` longer to write, as fc6/fc7 at 4096 (about 1.6 GB) do on a disk
    that syncs 233 MB/s: a write then outlasts an epoch of the narrow test model."""
    real = save_checkpoint
    monkeypatch.setattr(engine.checkpoints, "save_checkpoint", lambda state, path: (time.sleep(seconds), real(state, path)))


def test_a_budget_whose_checkpoint_write_outlasts_an_epoch_ends_completed_in_time(data, tmp_path, monkeypatch):
    """Checkpoints written every epoch, each write (best.pth + last.pth: 2 s) longer than the epoch: a 20 s
    budget still ends at its planned last step, validated and saved, lr 0, within the budget."""
    slow_writes(monkeypatch, 1.0)
    fit_in_process(fx.train_args(data, tmp_path, "--epochs", "1000", "--schedule", "poly", "--save-every", "0",
                                 "--time-budget", "20s")[1:], monkeypatch)  # the clock starts at set-up
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["completed"] and results["time_budget"]["spent"] <= 20
    rows = fx.read_history(tmp_path / "history.csv")
    # The scenario: a write outlasts an epoch's training. Not 4 x costs["step"]: the last epoch may be one step
    # long, and its pace then includes the loader's start.
    assert results["time_budget"]["costs"]["save"] > statistics.median(float(row["train_seconds"]) for row in rows)
    assert fx.load(tmp_path / "last.pth")["scheduler"]["last_epoch"] == results["time_budget"]["total"]
    assert len(rows) >= 3 and float(rows[-1]["lr"]) == 0.0 and rows[-1]["val_miou"]


def test_a_stopped_budgeted_run_resumes_on_its_plan(data, tmp_path, monkeypatch, capsys):
    """Budget ample for the 4 epochs --epochs allows: stopped in epoch 2 and resumed, it keeps the plan and
    ends with the weights and history of an uninterrupted 4-epoch run without a budget."""
    common = fx.train_args(data, tmp_path, "--seed", "3", "--schedule", "poly", "--warmup-epochs", "1",
                           "--epochs", "4")[1:]
    out = ["--out", str(tmp_path / "cut")]
    fit_in_process(common + out + ["--time-budget", "10m"], monkeypatch, stop_after=6)
    assert "time budget 10m: 4 epochs" in capsys.readouterr().out
    saved = load_checkpoint(tmp_path / "cut" / "last.pth")
    assert saved["epoch"] == 1 and saved["partial_epoch"]["steps"] == 2 and saved["budget"]["total"] == 16
    fit_in_process(common + out + ["--time-budget", "10m", "--resume"], monkeypatch)
    fit_in_process(common + ["--out", str(tmp_path / "whole")], monkeypatch)
    cut, whole = fx.load(tmp_path / "cut" / "last.pth"), fx.load(tmp_path / "whole" / "last.pth")
    assert cut["epoch"] == whole["epoch"] == 4 and cut["scheduler"]["last_epoch"] == 16
    assert fx.without_wall_time(fx.read_history(tmp_path / "cut" / "history.csv")) == \
        fx.without_wall_time(fx.read_history(tmp_path / "whole" / "history.csv"))
    fx.assert_same_weights(cut["model"], whole["model"])
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["completed"]


def test_a_budget_added_on_resume_counts_from_there_and_goes_on_from_the_rate_reached(data, tmp_path, monkeypatch):
    """A plain 4-epoch poly run stopped after epoch 2, resumed with --time-budget: no jump back to the base rate
    (epoch 3 runs the plain schedule's rates), the budget counts from the resume, and the plan (capped by
    --epochs 4) anneals to 0 at the plain run's last step."""
    common = fx.train_args(data, tmp_path, "--seed", "3", "--schedule", "poly", "--epochs", "4")[1:]
    fit_in_process(common + ["--out", str(tmp_path / "whole")], monkeypatch)
    fit_in_process(common + ["--out", str(tmp_path / "cut")], monkeypatch, stop_after=8)
    fit_in_process(common + ["--out", str(tmp_path / "cut"), "--time-budget", "10m", "--resume"], monkeypatch)
    cut, whole = fx.read_history(tmp_path / "cut" / "history.csv"), fx.read_history(tmp_path / "whole" / "history.csv")
    assert [float(row["lr"]) for row in cut] == pytest.approx([float(row["lr"]) for row in whole], rel=1e-9)
    results = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert results["completed"] and results["time_budget"]["total"] == 16
    assert results["time_budget"]["spent"] < 300  # this process's time, not a budget counted from epoch 1


def test_a_run_resumed_in_its_measured_epoch_times_its_checkpoint_write(data, tmp_path, monkeypatch, capsys):
    """Stopped in its first epoch (last.pth exists), resumed: the measured epoch still writes its checkpoints and
    times them, so the plan never counts the final write as free."""
    common = fx.train_args(data, tmp_path, "--epochs", "6", "--time-budget", "10m", "--schedule", "poly")[1:]
    fit_in_process(common, monkeypatch, stop_after=2)
    fit_in_process(common + ["--resume"], monkeypatch)
    plan = [line for line in capsys.readouterr().out.splitlines() if line.startswith("time budget 10m: ")]
    assert len(plan) == 1 and not re.search(r"checkpoint 0\.0 s", plan[0]), plan
    state = load_checkpoint(tmp_path / "last.pth")["budget"]
    assert state["costs"]["save"] > 0 and state["total"] == 24


def diverging_on(rank_epoch: tuple[int, int]):
    """accumulation_step whose loss is NaN in `epoch` on `rank` (the weights stay finite)."""
    real = accumulation_step

    def step(model, batches, optimizer, scaler, loss_fn, loop, epoch, index):
        loss = real(model, batches, optimizer, scaler, loss_fn, loop, epoch, index)
        return loss * math.nan if (loop.dist.rank, epoch) == rank_epoch else loss
    return step


def test_a_divergence_keeps_the_good_checkpoints_and_writes_the_folder(data, tmp_path, monkeypatch):
    """NaN loss in epoch 2: last.pth and best.pth stay epoch 1's, results.json says where and why."""
    monkeypatch.setattr(engine.loop, "accumulation_step", diverging_on((0, 2)))
    with pytest.raises(TrainingDiverged):
        fit_in_process(fx.train_args(data, tmp_path, "--epochs", "3")[1:], monkeypatch)
    assert all((tmp_path / name).is_file() for name in RUN_FILES)
    assert fx.load(tmp_path / "last.pth")["epoch"] == 1 and fx.load(tmp_path / "best.pth")["epoch"] == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["completed"] and results["stopped_epoch"] == 2 and results["stop_reason"].startswith("diverged")
    with open(tmp_path / "history.csv", newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1"]


def test_a_deadline_in_the_middle_ends_the_run_there_validated(data, tmp_path, monkeypatch, capsys):
    """Steps far slower than planned: once only the reserve is left (here at epoch 2's first step) the plan's end
    moves to that step; the run ends there with lr 0, validated and saved, within its budget."""
    real_left = Budget.left
    monkeypatch.setattr(Budget, "left", lambda self: real_left(self) if self.total is None else 0.0)
    fit_in_process(fx.train_args(data, tmp_path, "--epochs", "5", "--time-budget", "10m", "--schedule", "poly")[1:],
                   monkeypatch)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["completed"] and results["time_budget"]["replans"][-1] == [5, 5]
    assert all((tmp_path / name).is_file() for name in RUN_FILES)
    last = load_checkpoint(tmp_path / "last.pth")
    assert last["epoch"] == 2 and last["scheduler"]["last_epoch"] == 5
    rows = fx.read_history(tmp_path / "history.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"] and rows[-1]["val_miou"] and float(rows[-1]["lr"]) == 0.0


def test_time_budget_flags(data, tmp_path):
    with pytest.raises(UserError, match="--time-budget needs --epochs of at least 2"):
        train.setup(train.parse_args(fx.train_args(data, tmp_path, "--time-budget", "1m", "--epochs", "1")[1:]))
    with pytest.raises(UserError, match="^--time-budget needs --schedule poly: a step decay cannot anneal"):
        train.setup(train.parse_args(fx.train_args(data, tmp_path, "--time-budget", "1m", "--schedule", "step")[1:]))
    assert train.parse_args(["--recipe", "camvid-cpu"]).time_budget == "60m"
    args = train.parse_args(fx.train_args(data, tmp_path, "--recipe", "camvid-cpu", "--time-budget", "none")[1:])
    train.check_args(args)
    assert args.time_budget is None


def test_a_budget_too_small_for_two_epochs_is_one_line_naming_one_that_works(data, tmp_path, monkeypatch):
    with pytest.raises(BudgetTooSmall, match=r"^--time-budget 3s: .*the smallest budget that works here is about "
                                             r"\d+(\.\d)?[smh]$"):
        fit_in_process(fx.train_args(data, tmp_path, "--epochs", "50", "--time-budget", "3", "--schedule", "poly")[1:],
                       monkeypatch)
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["completed"] and "--time-budget 3s" in results["stop_reason"]
