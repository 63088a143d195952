"""--resume reproduces an uninterrupted run under the full recipe: poly schedule with warm-up, weight decay,
clipping, random scale/crop/flip/jitter, and two data-loader workers; with --ema and --aux-weight, the weight
average too."""
import csv

import pytest
import torch

from conftest import SMALL_TRAIN, train_in_process

# The CamVid recipe on the tiny data: 2 steps an epoch, warm-up over epoch 1, poly decay after it.
RECIPE = ["--recipe", "camvid", "--warmup-epochs", "1", "--seed", "3", "--workers", "2"]


def history(path):
    """history.csv rows minus the wall-clock columns (`seconds`, `*_seconds`), which differ between any runs."""
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds" and not k.endswith("_seconds")}
                for row in csv.DictReader(handle)]


def weights(path, key="model"):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state[key] if key == "model" else state[key]["model"]


@pytest.mark.parametrize("levers", [(), ("--ema", "0.9", "--aux-weight", "0.4")], ids=["recipe", "ema-aux"])
def test_resumed_run_equals_an_uninterrupted_one(camvid, tmp_path, levers):
    def train(out, *extra):
        train_in_process("--data-root", str(camvid), "--out", str(out), *SMALL_TRAIN, *RECIPE, *levers, *extra)
    train(tmp_path / "whole", "--epochs", "3")
    train(tmp_path / "resumed", "--epochs", "1")
    train(tmp_path / "resumed", "--epochs", "3", "--resume")
    whole, resumed = history(tmp_path / "whole" / "history.csv"), history(tmp_path / "resumed" / "history.csv")
    assert [row["epoch"] for row in resumed] == ["1", "2", "3"]
    assert len({row["lr"] for row in whole}) == 3  # the schedule really moves: warm-up, then poly decay
    assert resumed == whole
    saved = [("last.pth", "model"), ("best.pth", "model")] + ([("last.pth", "ema")] if levers else [])
    for name, key in saved:
        first, second = weights(tmp_path / "whole" / name, key), weights(tmp_path / "resumed" / name, key)
        assert [k for k in first if not torch.equal(first[k], second[k])] == [], name
