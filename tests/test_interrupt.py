"""Interrupting train.py: SIGTERM/SIGINT stop after the current step with a resumable last.pth and exit 0,
SIGKILL never leaves a truncated checkpoint, and --resume (from an epoch boundary or from the middle of an
epoch) ends with history.csv holding every epoch once and the same model as an uninterrupted run.

Determinism: with one --seed, two CPU runs give identical history.csv rows in every column except
`seconds`, which is wall-clock time."""
from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_dist as fx  # noqa: E402

import utils  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and fork")

EPOCHS = ["--epochs", "3", "--seed", "7", "--log-every", "1", "--save-every", "0"]  # checkpoint every epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 train images: 4 steps of 2 per epoch, time enough to land a signal in the middle of epoch 2."""
    return fx.write_camvid(tmp_path_factory.mktemp("interrupt") / "CamVid", {"train": 8, "val": 3, "test": 2})


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run: what every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    fx.run([sys.executable, *fx.train_args(data, out, *EPOCHS)])
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    """Epochs 1..3 exactly once, the reference's numbers, and bit-identical final weights."""
    rows = fx.read_history(out / "history.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert fx.without_wall_time(rows) == fx.without_wall_time(fx.read_history(reference / "history.csv"))
    last, expected = fx.load(out / "last.pth"), fx.load(reference / "last.pth")
    assert last["epoch"] == 3 and [row["epoch"] for row in last["history"]] == [1, 2, 3]
    fx.assert_same_weights(last["model"], expected["model"])
    fx.assert_same_weights(fx.load(out / "best.pth")["model"], fx.load(reference / "best.pth")["model"])


def test_same_seed_gives_identical_history(data: Path, reference: Path, tmp_path: Path):
    """Every history.csv column but `seconds` (wall-clock time), and the weights, match bit for bit."""
    fx.run([sys.executable, *fx.train_args(data, tmp_path, *EPOCHS)])
    assert_same_run(tmp_path, reference)


def test_sigkill_in_epoch_two_then_resume(data: Path, reference: Path, tmp_path: Path):
    command = [sys.executable, *fx.train_args(data, tmp_path / "run", *EPOCHS)]
    process, _, stderr = fx.start(command, tmp_path)
    fx.wait_for_step(process, stderr, epoch=2)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    saved = utils.load_checkpoint(tmp_path / "run" / "last.pth")  # complete, not truncated
    assert saved["epoch"] == 1 and saved["partial_epoch"]["steps"] == 0
    utils.load_checkpoint(tmp_path / "run" / "best.pth")
    assert [row["epoch"] for row in fx.read_history(tmp_path / "run" / "history.csv")] == ["1"]
    stale = tmp_path / "run" / ".last.pth.tmp99999"  # what a kill in the middle of a checkpoint write leaves
    stale.write_bytes(b"half a checkpoint")
    fx.run(command + ["--resume"])
    assert not stale.exists()
    assert_same_run(tmp_path / "run", reference)


def test_sigterm_mid_epoch_saves_and_resume_matches_an_uninterrupted_run(data: Path, reference: Path,
                                                                         tmp_path: Path):
    command = [sys.executable, *fx.train_args(data, tmp_path / "run", *EPOCHS)]
    process, stdout, stderr = fx.start(command, tmp_path)
    fx.wait_for_step(process, stderr, epoch=2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, stderr.read_text()
    message = stdout.read_text()
    assert "SIGTERM: stopped in epoch 2 after step" in message
    assert "Resume with the same command plus --resume" in message
    saved = utils.load_checkpoint(tmp_path / "run" / "last.pth")
    assert saved["epoch"] == 1 and saved["partial_epoch"]["steps"] >= 1  # the partial epoch is kept
    resumed = fx.run(command + ["--resume"])
    assert "epoch 1:" not in resumed.stdout  # nothing redone: epoch 2 continues where it stopped
    assert_same_run(tmp_path / "run", reference)


def test_sigint_stops_cleanly_with_a_resume_hint(data: Path, tmp_path: Path):
    command = [sys.executable, *fx.train_args(data, tmp_path / "run", "--epochs", "1", "--log-every", "1")]
    process, stdout, stderr = fx.start(command, tmp_path)
    fx.wait_for_step(process, stderr, epoch=1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0, stderr.read_text()
    assert "SIGINT: stopped in epoch 1" in stdout.read_text()
    assert "Traceback" not in stderr.read_text()
    assert utils.load_checkpoint(tmp_path / "run" / "last.pth")["partial_epoch"]["steps"] >= 1


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path: Path):
    target = tmp_path / "last.pth"
    utils.save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, target)

    def broken(temporary: Path) -> None:
        temporary.write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError):
        utils.atomic_write(target, broken)
    assert torch.equal(utils.load_checkpoint(target)["model"]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary left behind


def test_sigkill_during_checkpoint_writes_never_truncates(tmp_path: Path):
    """SIGKILL a process that rewrites a 4 MB checkpoint in a loop, at several moments: the file always
    loads whole, holding one of the two states (a forked child: no second interpreter start-up)."""
    target = tmp_path / "last.pth"
    states = [{"model": {"w": torch.full((1 << 20,), float(i))}, "config": {}} for i in range(2)]
    utils.save_checkpoint(states[0], target)
    for delay in (0.005, 0.02, 0.05, 0.11, 0.23):
        pid = os.fork()
        if pid == 0:  # the child writes until it is killed
            try:
                for i in itertools.count(1):
                    utils.save_checkpoint(states[i % 2], target)
            finally:
                os._exit(1)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL  # killed, not finished
        weights = utils.load_checkpoint(target)["model"]["w"]
        assert weights.shape == (1 << 20,) and float(weights[0]) in (0.0, 1.0)
        assert bool((weights == weights[0]).all())
