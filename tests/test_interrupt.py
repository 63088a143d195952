"""Interrupting train.py: SIGTERM/SIGINT stop after the current step with a resumable last.pth and exit 0,
SIGKILL never leaves a truncated checkpoint, and --resume (from an epoch boundary or from the middle of an
epoch) ends with history.csv holding every epoch once and the same model as an uninterrupted run.

Determinism: with one --seed, two CPU runs in fp32 give identical history.csv rows in every column except
the `*seconds` columns, which are wall-clock time. bf16 runs are not bit-reproducible on every CPU: a CPU
whose bf16 results vary from run to run is simulated below, and the bit-for-bit comparisons hold there."""
from __future__ import annotations

import io
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_dist as fx  # noqa: E402
from conftest import settings_of, train_in_process  # noqa: E402

import devices  # noqa: E402
import engine.checkpoints  # noqa: E402
import engine.loop  # noqa: E402
import inference  # noqa: E402
import test as test_script  # noqa: E402
import train  # noqa: E402
from dataset import ClassTable
from engine.build import build_optimizer, load_optimizer_state, restore
from engine.checkpoints import Folder, atomic_write, load_checkpoint, save_checkpoint
from engine.plots import plot_curves
from engine.run import EpochProgress, Run, Runtime
from engine.schedule import Schedule  # noqa: E402
from fcn import FCN, FCNConfig  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and fork")

EPOCHS = ["--epochs", "3", "--seed", "7", "--log-every", "1", "--save-every", "0"]  # checkpoint every epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 train images: 4 steps of 2 per epoch, time enough to land a signal in the middle of epoch 2."""
    return fx.write_camvid(tmp_path_factory.mktemp("interrupt") / "CamVid", {"train": 8, "val": 3, "test": 2})


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run: what every interrupted-and-resumed run must reproduce (in this process: the
    runs that reproduce it run in their own, so every comparison is across processes)."""
    out = tmp_path_factory.mktemp("reference")
    train_in_process(*fx.train_args(data, out, *EPOCHS)[1:])
    return out


def assert_same_run(out: Path, reference: Path, epochs: int = 3) -> None:
    """Every epoch exactly once, the reference's numbers, and bit-identical final weights."""
    rows = fx.read_history(out / "history.csv")
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(1, epochs + 1)]
    assert fx.without_wall_time(rows) == fx.without_wall_time(fx.read_history(reference / "history.csv"))
    last, expected = fx.load(out / "last.pth"), fx.load(reference / "last.pth")
    assert last["epoch"] == epochs and [row["epoch"] for row in last["history"]] == list(range(1, epochs + 1))
    fx.assert_same_weights(last["model"], expected["model"])
    fx.assert_same_weights(fx.load(out / "best.pth")["model"], fx.load(reference / "best.pth")["model"])


def test_same_seed_gives_identical_history(data: Path, reference: Path, tmp_path: Path):
    """Every history.csv column but the `*seconds` (wall-clock time), and the weights, match bit for bit."""
    fx.run([sys.executable, *fx.train_args(data, tmp_path, *EPOCHS)])
    assert_same_run(tmp_path, reference)


@pytest.fixture
def unreproducible_bf16(monkeypatch):
    """This CPU made one whose bf16 kernels give other last bits in every run (as oneDNN's on an AVX512-BF16
    CPU without AMX): --amp picks bf16 here, and every forward under bf16 autocast is nudged by noise that no
    seed controls. fp32 stays exact."""
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: True)
    noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    forward = FCN.forward

    def nudged(self, images):
        logits = forward(self, images)
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            logits = logits + 1e-3 * logits.detach().abs().mean() * torch.randn(logits.shape, generator=noise)
        return logits
    monkeypatch.setattr(FCN, "forward", nudged)


def two_runs(data: Path, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    for name in ("first", "second"):
        train_in_process(*fx.train_args(data, tmp_path / name, "--epochs", "2", "--seed", "7", *extra)[1:])
    return tmp_path / "first", tmp_path / "second"


def test_the_bit_for_bit_comparisons_run_in_fp32_where_bf16_is_not_reproducible(data, tmp_path, unreproducible_bf16):
    """The suite's run comparisons (fixtures_dist.train_args, conftest.SMALL_TRAIN) hold on such a CPU."""
    first, second = two_runs(data, tmp_path)
    assert json.loads((first / "results.json").read_text())["precision"] == "fp32"
    assert_same_run(second, first, epochs=2)


def test_bf16_runs_agree_within_a_tolerance_not_bit_for_bit(data, tmp_path, unreproducible_bf16):
    """Two bf16 runs with one seed on such a CPU: other weights, the same history within 1 %."""
    first, second = two_runs(data, tmp_path, "--amp")
    assert json.loads((first / "results.json").read_text())["precision"] == "bf16"
    a, b = fx.load(first / "last.pth")["model"], fx.load(second / "last.pth")["model"]
    assert any(not torch.equal(a[key], b[key]) for key in a)
    for one, other in zip(fx.read_history(first / "history.csv"), fx.read_history(second / "history.csv")):
        for key in ("train_loss", "val_loss", "lr"):
            assert float(one[key]) == pytest.approx(float(other[key]), rel=1e-2), key


def test_sigkill_in_epoch_two_then_resume(data: Path, reference: Path, tmp_path: Path):
    """With the default --save-every (300 s, far longer than this run) the first validated epoch still writes
    last.pth and best.pth: a kill -9 after it leaves a run to resume and a model that test.py scores."""
    command = [sys.executable, *fx.train_args(data, tmp_path / "run", *EPOCHS[:-2])]
    assert "--save-every" not in command
    process, _, stderr = fx.start(command, tmp_path)
    fx.wait_for_step(process, stderr, epoch=2)
    fx.wait_for_file(tmp_path / "run" / "last.pth")  # written in the background while epoch 2 trains
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    saved = load_checkpoint(tmp_path / "run" / "last.pth")  # complete, not truncated
    assert saved["epoch"] == 1 and saved["partial_epoch"]["steps"] == 0
    metrics = test_script.main(test_script.get_args_parser().parse_args(
        ["--data-root", str(data), "--split", "val", "--weights", str(tmp_path / "run" / "best.pth"),
         "--workers", "0", "--device", "cpu"]))
    assert 0 <= metrics["miou"] <= 1
    assert [row["epoch"] for row in fx.read_history(tmp_path / "run" / "history.csv")] == ["1"]
    stale = tmp_path / "run" / ".last.pth.tmp99999"  # what a kill in the middle of a checkpoint write leaves
    stale.write_bytes(b"half a checkpoint")
    train_in_process(*command[2:], "--resume")
    assert not stale.exists()
    assert_same_run(tmp_path / "run", reference)


def test_sigterm_mid_epoch_saves_and_resume_matches_an_uninterrupted_run(data: Path, reference: Path,
                                                                         tmp_path: Path, capsys):
    command = [sys.executable, *fx.train_args(data, tmp_path / "run", *EPOCHS)]
    process, stdout, stderr = fx.start(command, tmp_path)
    fx.wait_for_step(process, stderr, epoch=2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, stderr.read_text()
    message = stdout.read_text()
    assert "SIGTERM: stopped in epoch 2 after step" in message
    assert "Resume with the same command plus --resume" in message
    saved = load_checkpoint(tmp_path / "run" / "last.pth")
    assert saved["epoch"] == 1 and saved["partial_epoch"]["steps"] >= 1  # the partial epoch is kept
    results = json.loads((tmp_path / "run" / "results.json").read_text())  # a complete folder, marked unfinished
    assert not results["completed"] and results["stopped_epoch"] == 2 and "SIGTERM" in results["stop_reason"]
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "val_samples.png").is_file()
    capsys.readouterr()
    train_in_process(*command[2:], "--resume")
    assert "epoch 1:" not in capsys.readouterr().out  # nothing redone: epoch 2 continues where it stopped
    assert_same_run(tmp_path / "run", reference)


def test_sigint_stops_cleanly_with_a_resume_hint(data: Path, tmp_path: Path):
    command = [sys.executable, *fx.train_args(data, tmp_path / "run", "--epochs", "1", "--log-every", "1")]
    process, stdout, stderr = fx.start(command, tmp_path)
    fx.wait_for_step(process, stderr, epoch=1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0, stderr.read_text()
    assert "SIGINT: stopped in epoch 1" in stdout.read_text()
    assert "Traceback" not in stderr.read_text()
    assert load_checkpoint(tmp_path / "run" / "last.pth")["partial_epoch"]["steps"] >= 1


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path: Path):
    target = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, target)

    def broken(temporary: Path) -> None:
        temporary.write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert torch.equal(load_checkpoint(target)["model"]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary left behind


def test_atomic_write_flushes_the_file_then_the_folder_to_the_disk(tmp_path: Path, monkeypatch):
    """A rename only survives a power loss once the file's data and the folder's entry are on the disk."""
    flushed, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda handle: (flushed.append(os.readlink(f"/proc/self/fd/{handle}")),
                                                     real_fsync(handle)))
    atomic_write(tmp_path / "results.json", lambda tmp: tmp.write_text("{}"))
    assert [Path(path).name for path in flushed] == [".results.json.tmp%d" % os.getpid(), tmp_path.name]


def test_sigkill_during_checkpoint_writes_never_truncates(tmp_path: Path):
    """SIGKILL a process that rewrites a 4 MB checkpoint in a loop, at several moments: the file always
    loads whole, holding one of the two states (a forked child: no second interpreter start-up)."""
    target = tmp_path / "last.pth"
    states = [{"model": {"w": torch.full((1 << 20,), float(i))}, "config": {}} for i in range(2)]
    save_checkpoint(states[0], target)
    for delay in (0.005, 0.02, 0.05, 0.11, 0.23):
        pid = os.fork()
        if pid == 0:  # the child writes until it is killed
            try:
                for i in itertools.count(1):
                    save_checkpoint(states[i % 2], target)
            finally:
                os._exit(1)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL  # killed, not finished
        weights = load_checkpoint(target)["model"]["w"]
        assert weights.shape == (1 << 20,) and float(weights[0]) in (0.0, 1.0)
        assert bool((weights == weights[0]).all())


def test_sigterm_to_the_whole_process_group_with_workers_stops_cleanly(data: Path, tmp_path: Path):
    """SLURM, `timeout` and systemd signal every process of the job, DataLoader workers included: the
    workers must leave it to the main process, which saves and exits 0; --resume then finishes."""
    command = [sys.executable, *fx.train_args(data, tmp_path / "run", "--epochs", "2", "--log-every", "1",
                                              "--workers", "2")]
    process, stdout, stderr = fx.start(command, tmp_path, start_new_session=True)
    fx.wait_for_step(process, stderr, epoch=1)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 0, stderr.read_text()
    assert "SIGTERM: stopped in epoch 1" in stdout.read_text()
    assert "Traceback" not in stderr.read_text()
    assert load_checkpoint(tmp_path / "run" / "last.pth")["partial_epoch"]["steps"] >= 1
    train_in_process(*command[2:], "--resume")
    assert [row["epoch"] for row in fx.read_history(tmp_path / "run" / "history.csv")] == ["1", "2"]


def trained_optimizer(channels_last: bool, optimizer: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A narrow FCN and its optimizer after one step, so momentum/Adam state exists."""
    torch.manual_seed(0)
    model = FCN(FCNConfig("fcn32s", "vgg16", 11, fc_width=8))
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optim = settings_of("--optimizer", optimizer, "--lr", "0.01", "--weight-decay", "5e-4").optim
    opt = build_optimizer(model, optim, torch.device("cpu"))
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    return model, opt


def checkpoint_round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_optimizer_state_resumes_with_this_runs_kernels_and_memory_format(optimizer: str, saved_channels_last: bool):
    """A checkpoint from an unfused run (foreach kernels, as --no-fused on CUDA) resumed in a fused CPU run, with
    the other --channels-last setting: this run's kernel flags, state tensors laid out like the parameters (the
    fused kernels need matching strides)."""
    _, saved = trained_optimizer(saved_channels_last, optimizer)
    state = saved.state_dict()
    for group in state["param_groups"]:
        group.update(fused=None, foreach=True)
    model, opt = trained_optimizer(not saved_channels_last, optimizer)
    load_optimizer_state(opt, checkpoint_round_trip(state))
    assert all(group["fused"] and not group["foreach"] for group in opt.param_groups)
    moments = 0
    for group, saved_group in zip(opt.param_groups, state["param_groups"]):
        for parameter, index in zip(group["params"], saved_group["params"]):
            for key, value in state["state"][index].items():
                if key != "step":  # momentum_buffer, exp_avg, exp_avg_sq: the parameter's shape and layout
                    assert opt.state[parameter][key].stride() == parameter.stride(), key
                    assert torch.equal(opt.state[parameter][key], value)
                    moments += 1
    assert moments >= len(list(model.parameters()))
    opt.step()  # the restored state works with this run's kernels


def restore_into(scaler: torch.amp.GradScaler, saved_scaler: dict) -> Run:
    """restore on a Run that has the pieces restore touches."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule("poly", 2, 4, 0))
    run = Run(None, None, model, optimizer, scheduler, scaler, None, None, None,
              Runtime(torch.device("cpu"), None, False), Folder(Path("unused")))
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": saved_scaler,
             "epoch": 3, "best_miou": 0.5, "history": [],
             "partial_epoch": {"steps": 2, "loss_sum": 1.0, "count": 4, "seconds": 1.5}}  # older key name
    restore(run, checkpoint_round_trip(state))
    return run


def test_scaler_state_resumes_whether_saved_empty_or_filled():
    """fp16 runs use a GradScaler; bf16 and CPU runs save a disabled one's empty state."""
    filled = torch.amp.GradScaler("cpu", init_scale=128.0)
    filled.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    run = restore_into(torch.amp.GradScaler("cpu"), {})  # bf16/CPU checkpoint, fp16 run: a fresh scale
    assert run.start_epoch == 4 and run.progress == EpochProgress(steps=2, loss_sum=1.0, count=4, train_seconds=0.0)
    assert restore_into(torch.amp.GradScaler("cpu"), filled.state_dict()).scaler.get_scale() == 128.0
    restore_into(torch.amp.GradScaler("cpu", enabled=False), filled.state_dict())  # fp16 checkpoint, bf16 run


def test_checkpoints_follow_save_every_and_unvalidated_epochs_stay_valid_csv(data: Path, tmp_path: Path,
                                                                              monkeypatch):
    """--save-every 3600 on a short run: checkpoints and plots at the first validated epoch (so a crash early
    on leaves something to test and resume) and after the last one (always validated and saved), none in
    between; --eval-every 2 leaves epoch 1's val cells empty; best.pth holds what inference needs."""
    saved, plotted = [], []
    real_save, real_plot = save_checkpoint, plot_curves
    monkeypatch.setattr(engine.checkpoints, "save_checkpoint", lambda state, path: (saved.append((Path(path).name, state["epoch"])),
                                                                        real_save(state, path)))
    monkeypatch.setattr(engine.loop, "plot_curves", lambda rows, path: (plotted.append(len(rows)), real_plot(rows, path)))
    monkeypatch.setattr(devices.StopFlag, "install", lambda self: None)  # keep pytest's own signal handlers
    out = tmp_path / "run"
    train.main(train.parse_args(fx.train_args(data, out, "--epochs", "3", "--eval-every", "2",
                                              "--save-every", "3600")[1:]))
    assert [epoch for name, epoch in saved if name == "last.pth"] == [2, 3]
    assert plotted == [2, 3] and (out / "val_samples.png").is_file()
    rows = fx.read_history(out / "history.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert rows[0]["val_miou"] == rows[0]["iou_Sky"] == "" and rows[1]["val_miou"] and rows[2]["val_miou"]
    for row in rows:
        parts = [float(row[key]) for key in ("train_seconds", "val_seconds", "other_seconds")]
        assert float(row["seconds"]) == pytest.approx(sum(parts), abs=0.002) and parts[0] > 0
    assert float(rows[0]["val_seconds"]) == 0 < float(rows[1]["val_seconds"])
    # last.pth's history holds the times of the epoch that wrote it too (up to the write itself): a resume
    # rewrites history.csv and results.json's wall_s from it
    saved = load_checkpoint(out / "last.pth")["history"]
    assert all(row["train_seconds"] > 0 and row["seconds"] >= row["train_seconds"] for row in saved)
    best = load_checkpoint(out / "best.pth")
    assert set(best) == {"model", "config", "metrics", "class_names", "class_table", "precision", "epoch"}
    assert best["epoch"] in (2, 3) and best["class_table"]["names"] == best["class_names"]
    assert best["metrics"]["miou"] == max(float(rows[1]["val_miou"]), float(rows[2]["val_miou"]))
    table = ClassTable.from_csv(data / "class_dict.csv")
    inference.model_from_checkpoint(best, table, out / "best.pth")  # what test.py, predict.py, --init-from do
