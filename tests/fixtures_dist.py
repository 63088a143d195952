"""Helpers for tests/test_distributed.py and tests/test_interrupt.py: a tiny CamVid-layout folder,
train.py command lines for a narrow CPU model, and readers for what a run leaves behind."""
from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import SMALL_TRAIN, end_with_stacks, run, subprocess_env, write_camvid  # noqa: E402,F401  (run, write_camvid: for the tests)

def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """train.py's arguments for a narrow CPU run on the tiny data."""
    return ["train.py", "--data-root", str(data), "--out", str(out), *SMALL_TRAIN, *extra]


def start(command: list[str], log_dir: Path, **popen) -> tuple[subprocess.Popen, Path, Path]:
    """Start a command in the background with stdout/stderr going to files (polled by wait_for_step)."""
    stdout, stderr = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=out, stderr=err, **popen)
    return process, stdout, stderr


def wait_for_step(process: subprocess.Popen, stderr: Path, epoch: int, timeout: float = 120) -> int:
    """Block until tqdm reports at least one finished step of `epoch` but not the whole epoch; the step count."""
    pattern = re.compile(rf"epoch {epoch}(?:/\d+)?:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for done, total in pattern.findall(stderr.read_text()):
            if 0 < int(done) < int(total):
                return int(done)
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before epoch {epoch} was under way:\n"
                                 f"{stderr.read_text()}")
        time.sleep(0.05)
    end_with_stacks(process)
    raise AssertionError(f"no progress in epoch {epoch} after {timeout}s:\n{stderr.read_text()}")


def wait_for_file(path: Path, timeout: float = 60) -> None:
    """Block until `path` exists (a checkpoint written in the background)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not written after {timeout}s")
        time.sleep(0.05)


def read_history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def without_wall_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """History rows minus the *seconds columns: wall-clock times differ between any two runs."""
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(first: dict, second: dict) -> None:
    """Two model state dicts are bit-for-bit equal."""
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"tensors differ: {different[:5]}"
