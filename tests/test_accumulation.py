"""--accum-steps K: the gradients of K batches per optimizer step equal one batch K times larger (VGG16 without
BatchNorm, dropout off), whatever the void pixels; the schedule, the logged loss and a mid-epoch resume count
optimizer steps; a resume that changes the images per step is refused."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_TRAIN, fit_in_process, write_camvid
from PIL import Image
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import train
from cfg import UserError
from devices import unwrap
from engine.checkpoints import load_checkpoint
from engine.loop import train_one_epoch
from engine.loss import SegmentationLoss
from engine.run import Run, Runtime
from engine.step import accumulation_step, gradient_sync

IMAGES = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 train images with 0, 5, 10, ... void rows on top: per-batch means of unequal batches would not
    add up to the large batch's mean, so only a shared denominator passes."""
    root = write_camvid(tmp_path_factory.mktemp("accum") / "CamVid", {"train": IMAGES, "val": 2})
    for index, mask in enumerate(sorted((root / "train_labels").glob("*_L.png"))):
        pixels = np.array(Image.open(mask))
        pixels[:5 * index] = 0  # the unlabelled colour
        Image.fromarray(pixels).save(mask)
    return root


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    """Full 64x96 images (void stripe and void rows included), no augmentation, plain SGD, fp32 (the gradients
    are compared to 1e-5, beyond bf16's precision)."""
    return ["--data-root", str(data), "--out", str(out), *SMALL_TRAIN, "--crop-size", "64", "96",
            "--optimizer", "sgd", "--momentum", "0", "--lr", "0.01", "--save-every", "0", "--no-amp", *extra]


def one_epoch(data: Path, out: Path, batch: int, accum: int, *extra: str) -> Run:
    """Set up a run, switch dropout off (its masks depend on the batch shape) and train epoch 1."""
    run = train.setup(train.parse_args(flags(data, out, "--batch-size", str(batch), "--accum-steps", str(accum),
                                             *extra)))
    for module in run.model.modules():
        if isinstance(module, torch.nn.Dropout2d):
            module.p = 0.0
    train_one_epoch(run.model, run.train_loader, run.optimizer, run.scheduler, run.scaler, run.loss_fn,
                          run.runtime, 1, run.progress)
    return run


def gradients(run: Run) -> dict[str, torch.Tensor]:
    """The gradients the last optimizer step used (zeroed only at the start of the next step)."""
    return {name: p.grad.clone() for name, p in unwrap(run.model).named_parameters()}


@pytest.mark.parametrize("extra", [(), ("--class-weights", "median-freq")], ids=["plain", "class-weights"])
@pytest.mark.parametrize("batch, accum", [(2, 4), (3, 3)])  # 3 x 3: batches of 3, 3 and 2 in one step
def test_accumulated_gradients_equal_one_large_batch(data, tmp_path, batch, accum, extra):
    large = one_epoch(data, tmp_path / "large", IMAGES, 1, *extra)
    small = one_epoch(data, tmp_path / "small", batch, accum, *extra)
    assert len(small.train_loader) == math.ceil(IMAGES / batch) > 1
    assert small.progress.steps == large.progress.steps == 1 and small.scheduler.last_epoch == 1
    expected, got = gradients(large), gradients(small)
    scale = max(g.abs().max() for g in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    # The logged train loss is the mean over the step's labelled pixels either way
    assert small.progress.loss_sum == pytest.approx(large.progress.loss_sum, rel=1e-5)


def test_schedule_and_progress_count_optimizer_steps(data, tmp_path):
    run = one_epoch(data, tmp_path, 2, 3, "--schedule", "poly", "--epochs", "1")  # 4 batches: steps of 3 and 1
    assert run.progress.steps == 2 and run.progress.count == IMAGES
    assert run.scheduler.last_epoch == 2
    assert run.optimizer.param_groups[0]["lr"] == 0.0  # the poly schedule ends with the epoch's last step


def test_an_all_void_batch_adds_nothing():
    loss = SegmentationLoss()
    logits, labels = torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 255)
    assert loss(logits, labels).item() == 0.0  # not NaN: the run goes on


def test_mid_epoch_resume_with_accumulation_matches_an_uninterrupted_run(data, tmp_path, monkeypatch, capsys):
    common = ["--batch-size", "2", "--accum-steps", "2", "--epochs", "2", "--seed", "5"]  # 2 steps an epoch
    fit_in_process(flags(data, tmp_path / "whole", *common), monkeypatch)
    fit_in_process(flags(data, tmp_path / "cut", *common), monkeypatch, stop_after=3)  # in epoch 2
    assert "stopped in epoch 2 after step 1 (2 batches)" in capsys.readouterr().out
    saved = load_checkpoint(tmp_path / "cut" / "last.pth")
    assert saved["epoch"] == 1 and saved["partial_epoch"]["steps"] == 1
    fit_in_process(flags(data, tmp_path / "cut", *common, "--resume"), monkeypatch)
    whole, cut = load_checkpoint(tmp_path / "whole" / "last.pth"), load_checkpoint(tmp_path / "cut" / "last.pth")
    assert cut["epoch"] == 2 and cut["scheduler"]["last_epoch"] == whole["scheduler"]["last_epoch"] == 4
    assert [row["train_loss"] for row in cut["history"]] == [row["train_loss"] for row in whole["history"]]
    for name, tensor in whole["model"].items():
        assert torch.equal(cut["model"][name], tensor), name


@pytest.fixture(scope="module")
def accumulated_run(data, tmp_path_factory) -> list[str]:
    """A finished 1-epoch run with batch 2 x 2; the flags that resume it."""
    out = tmp_path_factory.mktemp("accumulated")
    with pytest.MonkeyPatch.context() as patch:
        fit_in_process(flags(data, out, "--batch-size", "2", "--accum-steps", "2", "--epochs", "1"), patch)
    return flags(data, out, "--batch-size", "2", "--accum-steps", "2", "--epochs", "2", "--resume")


@pytest.mark.parametrize("change, message", [
    (["--batch-size", "2", "--accum-steps", "1"], "trained with 4 images per optimizer step per process"),
    (["--backbone-lr-mult", "0.1"], "trained with --backbone-lr-mult 1.0"),
])
def test_resume_refuses_a_change_of_what_last_pth_means(accumulated_run, change, message):
    with pytest.raises(UserError, match=message):
        train.setup(train.parse_args(accumulated_run + change))


def test_resume_accepts_the_same_images_per_step_in_another_shape(accumulated_run):
    run = train.setup(train.parse_args(accumulated_run + ["--batch-size", "4", "--accum-steps", "1"]))
    assert run.start_epoch == 2  # e.g. after moving to a GPU that holds batch 4


def test_ddp_all_reduces_once_per_optimizer_step(tmp_path):
    """Under DDP the batches of a step but the last run under no_sync (found inside torch.compile's wrapper
    too), so the gradients are all-reduced once per optimizer step, not once per batch."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 4, 1))
        reductions = []

        def counting_allreduce(state, bucket):
            reductions.append(1)
            return default_hooks.allreduce_hook(state, bucket)
        ddp.register_comm_hook(None, counting_allreduce)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        loop = Runtime(torch.device("cpu"), None, False, accum_steps=3)
        batches = [(torch.randn(2, 3, 4, 4), torch.randint(0, 4, (2, 4, 4))) for _ in range(3)]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        accumulation_step(ddp, batches, optimizer, scaler, SegmentationLoss(), loop, epoch=1, step=0)
        assert len(reductions) == 1  # one bucket, reduced once
        compiled = torch.nn.Module()
        compiled._orig_mod = ddp  # the attribute torch.compile's OptimizedModule keeps the original in
        with gradient_sync(compiled, sync=False):
            assert not ddp.require_backward_grad_sync
    finally:
        torch.distributed.destroy_process_group()
