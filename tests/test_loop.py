"""What keeps the training loop at benchmark speed, checked on the CPU: the warm-up meets every batch shape before
the first measured epoch and learns nothing, --eval-every auto keeps validation to its share, and results.json
records the peak memory."""
from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

import devices
import train
from conftest import SMALL_TRAIN, settings_of, train_in_process
from devices import unwrap
from engine import loop
from engine.build import build_optimizer
from engine.run import EvalCadence
from engine.warmup import batch_sizes, warm_up


def test_batch_sizes_are_the_full_and_the_last_batch():
    assert batch_sizes(367, 8) == [8, 7]  # CamVid's train split
    assert batch_sizes(101, 8) == [8, 5] and batch_sizes(16, 8) == [8] and batch_sizes(3, 8) == [3]


def small_run(camvid: Path, out: Path, *extra: str):
    return train.setup(train.parse_args(["--data-root", str(camvid), "--out", str(out), *SMALL_TRAIN,
                                         "--backbone", "vgg16_bn", "--optimizer", "sgd", *extra]))


def test_warm_up_meets_every_shape_and_learns_nothing(camvid, tmp_path):
    run = small_run(camvid, tmp_path)
    run.runtime.compile = True  # what makes a CPU run warm up (the model itself stays eager here)
    before = {k: v.clone() for k, v in unwrap(run.model).state_dict().items()}
    rng = torch.get_rng_state()
    shapes = warm_up(run)
    # 4 train images in batches of 2 (32x32 crops); 3 val images of 64x96 in batches of 2: 2 and 1
    assert shapes == [("train", (2, 3, 32, 32)), ("val", (2, 3, 64, 96)), ("val", (1, 3, 64, 96))]
    after = unwrap(run.model).state_dict()
    assert any("running_mean" in k for k in after)  # BatchNorm statistics, which a train forward moves
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert all(p.grad is None for p in run.model.parameters()) and not run.optimizer.state
    assert torch.equal(torch.get_rng_state(), rng) and run.model.training


def test_warm_up_runs_the_val_shapes_at_the_test_scale(camvid, tmp_path):
    run = small_run(camvid, tmp_path, "--test-scale", "1.5")
    run.runtime.compile = True
    inputs = []
    run.inference_model().register_forward_pre_hook(lambda module, args: inputs.append(tuple(args[0].shape)))
    warm_up(run)
    assert inputs == [(2, 3, 32, 32), (2, 3, 96, 144), (1, 3, 96, 144)]  # val images of 64x96, run at 1.5x


def test_val_samples_are_drawn_at_the_test_scale(camvid, tmp_path):
    run = small_run(camvid, tmp_path, "--test-scale", "1.5")
    inputs = []
    run.inference_model().register_forward_pre_hook(lambda module, args: inputs.append(tuple(args[0].shape)))
    images, labels, predictions = loop.val_samples(run)
    assert inputs == [(3, 3, 96, 144)] and predictions.shape == labels.shape == (3, 64, 96)


def test_no_warm_up_on_a_cpu_without_compile(camvid, tmp_path):
    assert warm_up(small_run(camvid, tmp_path)) == []


def test_auto_cadence_keeps_validation_to_its_share():
    cadence = EvalCadence(auto=True, share=0.04)
    assert cadence.due(1) and cadence.every == 1
    assert cadence.measured(train_seconds=1.0, val_seconds=0.13)  # a GPU epoch: validation 13 % of training
    assert cadence.every == 4 and 0.13 / (4 * 1.0) <= 0.04 and [e for e in range(1, 13) if cadence.due(e)] == [4, 8, 12]
    assert not cadence.measured(train_seconds=10.0, val_seconds=1.5)  # 1.5 / (4 x 10) = 3.75 %: unchanged
    cadence.measured(train_seconds=10.0, val_seconds=0.1)
    assert cadence.every == 1
    fixed = EvalCadence(2)
    assert not fixed.measured(1.0, 5.0) and fixed.every == 2


def test_eval_every_auto_reaches_the_run(camvid, tmp_path):
    assert settings_of("--eval-every", "auto").run.eval_every is None
    assert settings_of("--eval-every", "3").run.eval_every == 3
    run = small_run(camvid, tmp_path, "--eval-every", "auto")
    assert run.cadence.auto and run.cadence.every == 1
    with pytest.raises(SystemExit):
        train.parse_args(["--eval-every", "often"])


def test_results_record_the_cadence_and_the_peak_memory(camvid, tmp_path, capsys):
    train_in_process("--data-root", str(camvid), "--out", str(tmp_path), *SMALL_TRAIN, "--epochs", "2",
                     "--eval-every", "auto")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["eval_every"] == "auto" and results["validated_epochs"] == 2  # the first epoch and the last
    assert results["peak_memory_of"] == "rss" and results["peak_memory_mb"] > 100
    assert "memory   peak " in capsys.readouterr().out


def test_fit_warms_up_before_the_first_epoch(camvid, tmp_path, monkeypatch):
    import engine.loop
    calls = []
    monkeypatch.setattr(engine.loop, "warm_up", lambda run: calls.append(len(run.history)) or [("train", (2,))])
    train_in_process("--data-root", str(camvid), "--out", str(tmp_path), *SMALL_TRAIN, "--epochs", "1")
    assert calls == [0]  # once, before any epoch


def test_a_finished_run_is_freed_without_the_cycle_collector(camvid, tmp_path, monkeypatch):
    """Nothing the loop leaves behind refers back to the run (the pace estimate's closure did, when a run ended
    before the estimate was printed): a process that trains twice keeps one model, not two."""
    monkeypatch.setattr(devices.StopFlag, "install", lambda self: None)
    run = small_run(camvid, tmp_path, "--epochs", "1")  # 2 steps: ended before the estimate after 4
    loop.fit(run)
    freed = weakref.ref(run)
    gc.disable()
    try:
        del run
        assert freed() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cpu_runs_step_with_fused_kernels_unless_told_not_to(optimizer):
    """--fused (the default) on the CPU: one fused kernel per step, the same update as the per-tensor loop;
    --no-fused: the per-tensor loop."""
    flags = ["--optimizer", optimizer, "--lr", "0.01", "--weight-decay", "5e-4"]
    models = {}
    for fused in ("--fused", "--no-fused"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 2, 1))
        optim = build_optimizer(model, settings_of(*flags, fused).optim, torch.device("cpu"))
        assert all(bool(group["fused"]) == (fused == "--fused") for group in optim.param_groups)
        for _ in range(3):
            optim.zero_grad()
            model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))).square().mean().backward()
            optim.step()
        models[fused] = model
    for (name, fused), unfused in zip(models["--fused"].named_parameters(), models["--no-fused"].parameters()):
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6, msg=name)
