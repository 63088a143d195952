"""Helpers for tests/test_distributed.py and tests/test_interrupt.py: a tiny CamVid-layout folder,
train.py command lines for a narrow CPU model, and readers for what a run leaves behind."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cfg  # noqa: E402

SIZE = (64, 96)  # H, W of every test image
# A narrow FCN-8s on the CPU. The 32x32 train crop (the smallest FCN input) keeps a step well under a
# second on 2 cores: the default 352x480 crop pads these images to 27x the pixels, ~5 s a step.
# Validation still runs on the full 64x96 images.
NARROW = ["--fc-width", "16", "--backbone", "vgg16", "--batch-size", "2", "--eval-batch-size", "2",
          "--workers", "0", "--device", "cpu", "--crop-size", "32", "32"]


def class_colors() -> tuple[np.ndarray, np.ndarray]:
    """(real class colours, void colours) straight from data/class_dict.csv."""
    with open(cfg.DEFAULT_CLASS_DICT, newline="") as handle:
        rows = list(csv.DictReader(handle))
    void = [r for r in rows if r["name"].strip().lower() == "unlabelled"]
    real = [r for r in rows if r not in void]
    as_array = lambda rs: np.array([[int(r["r"]), int(r["g"]), int(r["b"])] for r in rs], np.uint8)
    return as_array(real), as_array(void)


def write_camvid(root: Path, train: int = 4, val: int = 3, test: int = 2, seed: int = 0) -> Path:
    """split/<stem>.png + split_labels/<stem>_L.png of SIZE: blocky masks in class_dict colours with an
    unlabelled (0,0,0) stripe, photos that follow the mask colour plus noise (so there is something to learn)."""
    colors, void = class_colors()
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}_labels").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            blocks = rng.integers(0, len(colors), size=(4, 6))
            mask = colors[np.kron(blocks, np.ones((SIZE[0] // 4, SIZE[1] // 6), np.int64))]
            mask[:, :5] = void[0]  # some unlabelled pixels: ignored by loss and metrics
            photo = np.clip(mask.astype(np.int64) + rng.integers(-40, 40, size=mask.shape), 0, 255)
            stem = f"{split}{index:03d}"
            Image.fromarray(photo.astype(np.uint8)).save(root / split / f"{stem}.png")
            Image.fromarray(mask).save(root / f"{split}_labels" / f"{stem}{cfg.MASK_SUFFIX}.png")
    return root


def env(**extra: str) -> dict[str, str]:
    """The subprocess environment: unbuffered output, no $CAMVID_ROOT leaking in, and one compute thread
    per process (what torchrun gives each worker): on a busy 2-core machine two OpenMP threads that wait
    on each other make a step up to 10x slower. Same thread count everywhere also keeps CPU runs
    bit-comparable."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CAMVID_ROOT": "", "OMP_NUM_THREADS": "1", **extra}


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """train.py's arguments for a narrow CPU run on the tiny data."""
    return ["train.py", "--data-root", str(data), "--out", str(out), *NARROW, *extra]


def run(command: list[str], timeout: float = 240, check: bool = True, **environment: str) -> subprocess.CompletedProcess:
    """Run a command in the repo root; a non-zero exit fails with both output streams."""
    result = subprocess.run(command, cwd=REPO, env=env(**environment), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def start(command: list[str], log_dir: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start a command in the background with stdout/stderr going to files (polled by wait_for_step)."""
    stdout, stderr = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env(), stdout=out, stderr=err)
    return process, stdout, stderr


def wait_for_step(process: subprocess.Popen, stderr: Path, epoch: int, timeout: float = 120) -> int:
    """Block until tqdm reports at least one finished step of `epoch` but not the whole epoch; the step count."""
    pattern = re.compile(rf"epoch {epoch}:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for done, total in pattern.findall(stderr.read_text()):
            if 0 < int(done) < int(total):
                return int(done)
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before epoch {epoch} was under way:\n"
                                 f"{stderr.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no progress in epoch {epoch} after {timeout}s:\n{stderr.read_text()}")


def read_history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def without_wall_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """History rows minus `seconds`: that column is wall-clock time and differs between any two runs."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(first: dict, second: dict) -> None:
    """Two model state dicts are bit-for-bit equal."""
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"tensors differ: {different[:5]}"
