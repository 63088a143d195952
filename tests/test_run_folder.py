"""What a run writes and when it may write it: a new run never touches a folder that holds another run,
--resume refuses in one line what it cannot continue exactly (nothing lost), the trainer says what it does
at the start, every epoch and the end, and --tensorboard writes events TensorBoard reads back."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import SMALL_TRAIN, run_cli, train_in_process

import train
from cfg import UserError
from engine import budget
from engine.checkpoints import RUN_FILES, check_resume, load_checkpoint
from engine.report import estimate_line


@pytest.fixture(scope="module")
def finished(camvid: Path, tmp_path_factory) -> Path:
    """A finished 2-epoch SGD run (the flags below)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(*flags(camvid, out, "--epochs", "2"))
    return out


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--out", str(out), *SMALL_TRAIN, "--optimizer", "sgd", "--lr", "0.01",
            "--momentum", "0.9", "--schedule", "poly", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def one_line_error(result) -> str:
    """The single `error: ...` line of a refused command (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_second_run_into_the_same_folder_is_refused_and_changes_nothing(finished, camvid):
    before = snapshot(finished)
    assert set(RUN_FILES) <= set(before)
    line = one_line_error(run_cli("train.py", *flags(camvid, finished, "--epochs", "3"), check=False))
    assert "already holds a run" in line and "--resume" in line and f"--out {finished}-2" in line
    assert snapshot(finished) == before


def test_each_recipe_has_its_own_default_folder():
    for argv, folder in (([], "weights/fcn8s"), (["--model", "fcn16s"], "weights/fcn16s"),
                         (["--recipe", "camvid"], "weights/camvid"), (["--recipe", "camvid-cpu"], "weights/camvid-cpu")):
        args = train.parse_args(argv)
        assert Path("weights") / (args.recipe or args.model) == Path(folder)


@pytest.mark.parametrize("change, saved", [
    (["--lr", "0.02"], "--lr 0.01"),
    (["--optimizer", "adam"], "--optimizer sgd"),
    (["--weight-decay", "0.001"], "--weight-decay 0.0"),
    (["--momentum", "0.5"], "--momentum 0.9"),
    (["--time-budget", "10m", "--schedule", "step"], None),  # a budget needs poly: refused before anything else
])
def test_resume_refuses_a_change_it_would_ignore_in_one_line(finished, camvid, change, saved):
    with pytest.raises(UserError) as error:
        train.setup(train.parse_args(flags(camvid, finished, "--epochs", "3", "--resume", *change)))
    message = str(error.value)
    if saved is not None:
        assert message.startswith(f"--resume: {finished / 'last.pth'} was trained with {saved}, this run asks for")
        assert f"resume with {saved}, or start a new run from its weights with --init-from" in message
    assert "\n" not in message


def test_resume_refuses_another_process_count(finished, camvid):
    settings = train.settings_from_args(train.parse_args(flags(camvid, finished, "--epochs", "3", "--resume")))
    config = load_checkpoint(finished / "last.pth")["config"]
    assert config["world_size"] == 1
    with pytest.raises(UserError, match=r"was trained by 1 process\(es\), this run has 2: resume with 1"):
        check_resume(settings, config, finished / "last.pth", world_size=2)


def test_a_refused_resume_exits_2_with_one_line_and_loses_nothing(finished, camvid):
    before = snapshot(finished)
    line = one_line_error(run_cli("train.py", *flags(camvid, finished, "--epochs", "3", "--resume", "--lr", "1"),
                                  check=False))
    assert "was trained with --lr 0.01" in line
    assert snapshot(finished) == before


def test_the_trainer_says_what_it_does(camvid, tmp_path):
    """The start block, a whole-run estimate after the first steps, `epoch N/M` with the time left, and at the
    end the best MIoU and its epoch, the files and the commands that use them."""
    out = tmp_path / "run"
    result = run_cli("train.py", *flags(camvid, out, "--epochs", "2", "--log-every", "2"))
    text = result.stdout
    for start in ("device   cpu", "model    fcn8s on vgg16, fc width 16: ", "data     ", "steps    2 images a step",
                  "plan     2 epochs", f"output   {out}"):
        assert re.search(rf"^{re.escape(start)}", text, re.MULTILINE), (start, text)
    assert re.search(r"parameters\n", text) and "4 train, 3 val images" in text
    assert re.search(r"pace     \d+\.\d+ s a step, ~\d+s an epoch: the whole run \(2 epochs\) takes about \d+s", text)
    assert re.search(r"^epoch 1/2: train_loss .*MIoU \d\.\d{4} \(\d+\.\ds; ~\d+s left\)$", text, re.MULTILINE)
    best = json.loads((out / "results.json").read_text())
    assert f"best val MIoU {best['miou']:.4f} (epoch {best['best_epoch']})" in text
    assert f"files    {out}/ last.pth best.pth history.csv results.json curves.png val_samples.png" in text
    assert f"python test.py --weights {out / 'best.pth'} --data-root {camvid} --split val" in text
    assert f"python predict.py --weights {out / 'best.pth'}" in text


def test_a_days_long_run_says_so_after_its_first_steps(camvid, tmp_path, monkeypatch):
    """A slow pace (as the full recipe on a CPU): the estimate printed after the first few steps says days."""
    args = train.parse_args(flags(camvid, tmp_path / "run", "--epochs", "300", "--log-every", "4"))
    run = train.setup(args)
    monkeypatch.setattr(budget, "process_age", lambda: 60.0)
    # 2 steps an epoch (10 min) and a validation of 3 images guessed at a third of a step each (2.5 min)
    line = estimate_line(run, per_step=300.0)
    assert line == "pace     300.00 s a step, ~12.5m an epoch: the whole run (300 epochs) takes about 2.7d"


def test_tensorboard_events_hold_the_scalars_and_the_samples(camvid, tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    train_in_process(*flags(camvid, out, "--epochs", "2", "--tensorboard"))
    events = accumulator.EventAccumulator(str(out), size_guidance={accumulator.IMAGES: 0, accumulator.SCALARS: 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/loss", "val/miou", "val/pa", "val/mpa", "val_iou/Sky",
            "val_iou/Bicyclist"} <= set(tags["scalars"])
    history = load_checkpoint(out / "last.pth")["history"]
    assert [event.step for event in events.Scalars("val/miou")] == [1, 2]
    assert [event.value for event in events.Scalars("val/miou")] == pytest.approx([row["val_miou"] for row in history])
    assert [event.value for event in events.Scalars("train/lr")] == pytest.approx([row["lr"] for row in history])
    assert "val/samples" in tags["images"] and len(events.Images("val/samples")) == 2


def test_tensorboard_missing_is_one_line_naming_the_install(camvid, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if TensorBoard were not installed
    with pytest.raises(UserError, match=r"^--tensorboard needs TensorBoard: pip install tensorboard$"):
        train.setup(train.parse_args(flags(camvid, tmp_path / "run", "--tensorboard")))
    assert not (tmp_path / "run").exists()
