"""--time-budget: durations, the schedule a budget re-plans, the epoch count it chooses, a budgeted run that ends
in time with its schedule annealed and its folder complete, and a stopped budgeted run that resumes on its plan."""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_dist as fx  # noqa: E402
from conftest import fit_in_process  # noqa: E402

import budget  # noqa: E402
import run_folder  # noqa: E402
import train  # noqa: E402
from budget import Budget, BudgetTooSmall, EpochCost, Schedule  # noqa: E402
from cfg import UserError  # noqa: E402

RUN_FILES = ("last.pth", "best.pth", "history.csv", "curves.png", "val_samples.png", "results.json")


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1.5h", 5400), ("600", 600), (" 2M ", 120)])
def test_durations(text, seconds):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "0", "-3m", "", "m", "1.5.2h"])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(UserError, match="expected a positive duration such as 90s"):
        budget.parse_duration(text)


def factors(schedule: Schedule) -> list[float]:
    return [schedule(step) for step in range(schedule.epochs * schedule.steps_per_epoch + 1)]


def test_a_budget_that_keeps_the_warm_up_plans_the_plain_schedule():
    """Warm-up short enough to keep: the re-planned factors are the plain schedule's, step for step."""
    plain = Schedule("poly", 5, 40, 2)
    planned = Schedule.provisional("poly", 5, 300, 2, 0.5, 50)
    planned.replan(40, step=5)
    assert planned.warmup_epochs == 2
    assert factors(planned) == pytest.approx(factors(plain), abs=1e-12)
    assert factors(plain)[-1] == 0.0 and factors(plain)[9] == pytest.approx(1.0)


@pytest.mark.parametrize("epochs, warmup", [(12, 2), (30, 3), (100, 5), (3, 2), (2, 1)])
def test_a_budget_shrinks_the_warm_up_to_its_share_without_a_jump(epochs, warmup):
    """5 warm-up epochs planned, `epochs` chosen after the first: the warm-up becomes about a tenth of them
    (at least 2 where the ramp can go on, fewer than the run), rises without a jump and the decay ends at 0."""
    per_epoch = 4
    schedule = Schedule.provisional("poly", per_epoch, 300, 5, 0.5, 50)
    before = [schedule(step) for step in range(per_epoch)]
    schedule.replan(epochs, step=per_epoch)
    values = factors(schedule)
    assert schedule.warmup_epochs == warmup
    assert values[:per_epoch] == before  # the measured epoch ran on the provisional ramp
    ramp = values[:warmup * per_epoch]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    if warmup > 1:
        assert max(ramp) == pytest.approx(1.0)
        steepest = max(b - a for a, b in zip(ramp, ramp[1:]))
        assert steepest <= 1 / per_epoch + 1e-9  # continuous: no step larger than one epoch's rise
    else:  # a 2-epoch run: the measured epoch was all the warm-up there is, the second decays from the full rate
        assert values[per_epoch] == 1.0
    assert values[-1] == 0.0 and values[-2] > 0


def test_without_warm_up_the_measured_epoch_runs_at_the_full_rate():
    schedule = Schedule.provisional("poly", 3, 100, 0, 0.5, 50)
    assert [schedule(step) for step in range(3)] == [1.0, 1.0, 1.0]
    schedule.replan(10, step=3)
    assert schedule(3) == 1.0 and schedule(29) > 0 and schedule(30) == 0.0


def spent_budget(seconds: float, spent: float) -> Budget:
    return Budget(seconds, time.monotonic() - spent)


def test_the_chosen_epochs_are_the_most_that_fit():
    cost = EpochCost(train=10.0, val=2.0, save=3.0)
    plan = spent_budget(600, spent=20)
    epochs = budget.choose_epochs(plan, cost, eval_every=2, save_every=300, max_epochs=1000)
    left = plan.left() - plan.margin()
    assert budget.time_needed(epochs - 1, cost, 2, 300) <= left < budget.time_needed(epochs, cost, 2, 300)
    assert budget.choose_epochs(plan, cost, 2, 300, max_epochs=7) == 7  # --epochs stays an upper bound
    # every second epoch validated (and the last), a checkpoint every 300 s of work and at the end
    assert budget.time_needed(3, cost, 2, 300) == 3 * 10 + 2 * 2 + 1 * 3
    assert budget.time_needed(3, cost, 1, 0) == 3 * 10 + 3 * 2 + 3 * 3


def test_a_budget_too_small_names_one_that_works():
    cost = EpochCost(train=30.0, val=5.0, save=2.0)
    with pytest.raises(BudgetTooSmall, match="too short for a second epoch") as error:
        budget.choose_epochs(spent_budget(60, spent=45), cost, 1, 300, 100)
    suggested = error.value.args[0].rsplit("about ", 1)[1]
    assert budget.choose_epochs(spent_budget(budget.parse_duration(suggested), spent=45), cost, 1, 300, 100) >= 2


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
    epochs = int(decision[0].split()[3])
    assert all((tmp_path / name).is_file() for name in RUN_FILES)
    last = fx.load(tmp_path / "last.pth")
    assert last["epoch"] == epochs == last["budget"]["epochs"] and last["scheduler"]["last_epoch"] == 4 * epochs
    rows = fx.read_history(tmp_path / "history.csv")
    assert len(rows) == epochs >= 3 and float(rows[-1]["lr"]) == 0.0 < float(rows[-2]["lr"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["completed"] and results["time_budget"]["epochs"] == epochs
    assert results["time_budget"]["spent"] <= seconds


def test_a_stopped_budgeted_run_resumes_on_its_plan(data, tmp_path, monkeypatch, capsys):
    """Budget ample for the 4 epochs --epochs allows: stopped in epoch 2, resumed with --epochs 9, it keeps the
    4 epochs it chose and ends with the weights and history of an uninterrupted 4-epoch run."""
    common = fx.train_args(data, tmp_path, "--seed", "3", "--schedule", "poly", "--warmup-epochs", "1")[1:]
    out = ["--out", str(tmp_path / "cut")]
    fit_in_process(common + out + ["--time-budget", "10m", "--epochs", "4"], monkeypatch, stop_after=6)
    assert "time budget 10m: 4 epochs" in capsys.readouterr().out
    saved = run_folder.load_checkpoint(tmp_path / "cut" / "last.pth")
    assert saved["epoch"] == 1 and saved["partial_epoch"]["steps"] == 2 and saved["budget"]["epochs"] == 4
    fit_in_process(common + out + ["--time-budget", "10m", "--epochs", "9", "--resume"], monkeypatch)
    fit_in_process(common + ["--out", str(tmp_path / "whole"), "--epochs", "4"], monkeypatch)
    cut, whole = fx.load(tmp_path / "cut" / "last.pth"), fx.load(tmp_path / "whole" / "last.pth")
    assert cut["epoch"] == whole["epoch"] == 4 and cut["scheduler"]["last_epoch"] == 16
    assert fx.without_wall_time(fx.read_history(tmp_path / "cut" / "history.csv")) == \
        fx.without_wall_time(fx.read_history(tmp_path / "whole" / "history.csv"))
    fx.assert_same_weights(cut["model"], whole["model"])
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["completed"]


def test_a_divergence_keeps_the_good_checkpoints_and_writes_the_folder(data, tmp_path, monkeypatch):
    """NaN loss in epoch 2: last.pth and best.pth stay epoch 1's, results.json says where and why."""
    real = train.check_finite

    def nan_in_epoch_two(loss_sum, epoch, step):
        real(loss_sum * math.nan if epoch == 2 else loss_sum, epoch, step)
    monkeypatch.setattr(train, "check_finite", nan_in_epoch_two)
    with pytest.raises(train.TrainingDiverged):
        fit_in_process(fx.train_args(data, tmp_path, "--epochs", "3")[1:], monkeypatch)
    assert all((tmp_path / name).is_file() for name in RUN_FILES)
    assert fx.load(tmp_path / "last.pth")["epoch"] == 1 and fx.load(tmp_path / "best.pth")["epoch"] == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["completed"] and results["stopped_epoch"] == 2 and results["stop_reason"].startswith("diverged")
    with open(tmp_path / "history.csv", newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1"]


def test_a_deadline_in_the_middle_stops_cleanly(data, tmp_path, monkeypatch, capsys):
    """Epochs slower than measured: the deadline comes in epoch 2; the run stops there, saves and says so."""
    monkeypatch.setattr(Budget, "must_stop", lambda self: self.epochs is not None)  # right after the plan
    fit_in_process(fx.train_args(data, tmp_path, "--epochs", "5", "--time-budget", "10m")[1:], monkeypatch)
    assert "time budget: stopped in epoch 2 after step 1" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["completed"] and results["stop_reason"].startswith("time budget")
    assert all((tmp_path / name).is_file() for name in RUN_FILES)
    assert run_folder.load_checkpoint(tmp_path / "last.pth")["partial_epoch"]["steps"] == 1


def test_time_budget_flags(data, tmp_path):
    with pytest.raises(UserError, match="--time-budget needs --epochs of at least 2"):
        train.setup(train.parse_args(fx.train_args(data, tmp_path, "--time-budget", "1m", "--epochs", "1")[1:]))
    assert train.parse_args(["--recipe", "camvid-cpu"]).time_budget == "60m"
    args = train.parse_args(fx.train_args(data, tmp_path, "--recipe", "camvid-cpu", "--time-budget", "none")[1:])
    train.check_args(args)
    assert args.time_budget is None


def test_a_budget_too_small_for_two_epochs_is_one_line_naming_one_that_works(data, tmp_path, monkeypatch):
    with pytest.raises(BudgetTooSmall, match=r"^--time-budget 3s: .*the smallest budget that works here is about "
                                             r"\d+(\.\d)?[smh]$"):
        fit_in_process(fx.train_args(data, tmp_path, "--epochs", "50", "--time-budget", "3")[1:], monkeypatch)
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["completed"] and "--time-budget 3s" in results["stop_reason"]
