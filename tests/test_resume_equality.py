"""--resume reproduces an uninterrupted run under the full recipe: poly schedule with warm-up, weight decay,
clipping, random scale/crop/flip/jitter, and two data-loader workers."""
import csv

import torch

from conftest import SMALL_TRAIN, train_in_process

# The CamVid recipe on the tiny data: 2 steps an epoch, warm-up over epoch 1, poly decay after it.
RECIPE = ["--recipe", "camvid", "--warmup-epochs", "1", "--seed", "3", "--workers", "2"]


def history(path):
    """history.csv rows minus the wall-clock columns (`seconds`, `*_seconds`), which differ between any runs."""
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds" and not k.endswith("_seconds")}
                for row in csv.DictReader(handle)]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resumed_run_equals_an_uninterrupted_one(camvid, tmp_path):
    def train(out, *extra):
        train_in_process("--data-root", str(camvid), "--out", str(out), *SMALL_TRAIN, *RECIPE, *extra)
    train(tmp_path / "whole", "--epochs", "3")
    train(tmp_path / "resumed", "--epochs", "1")
    train(tmp_path / "resumed", "--epochs", "3", "--resume")
    whole, resumed = history(tmp_path / "whole" / "history.csv"), history(tmp_path / "resumed" / "history.csv")
    assert [row["epoch"] for row in resumed] == ["1", "2", "3"]
    assert len({row["lr"] for row in whole}) == 3  # the schedule really moves: warm-up, then poly decay
    assert resumed == whole
    for name in ("last.pth", "best.pth"):
        first, second = weights(tmp_path / "whole" / name), weights(tmp_path / "resumed" / name)
        assert [k for k in first if not torch.equal(first[k], second[k])] == [], name
