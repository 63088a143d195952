"""The accuracy options of train.py: --ema (the average is what is validated and saved), --aux-weight (deep
supervision reaches the coarse head only, inference unchanged), capped median-frequency weights, and
--train-splits (several splits paired once, val not held out, best.pth the last epoch)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import SMALL_TRAIN, real_camvid, run_cli, train_in_process, write_camvid
from torch import nn

import engine.loop
import inference
import train
from cfg import UserError
from dataset import CamVidDataset, ClassTable, parse_splits
from engine.checkpoints import load_checkpoint
from engine.ema import WeightAverage
from engine.loss import SegmentationLoss, class_weights
from engine.run import Runtime
from engine.step import backward
from fcn import FCN, FCNConfig

TABLE = ClassTable.from_csv(Path(__file__).resolve().parents[1] / "data" / "class_dict.csv")


# ---------------------------------------------------------------- --ema

def test_the_average_follows_the_weights_by_its_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    average = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in average.model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(5)
    average.update()  # update 1: decay min(0.9, 2/11)
    got, step = average.model.state_dict(), 1 - 2 / 11
    torch.testing.assert_close(got["0.weight"], start["0.weight"] + step * 1.0)
    torch.testing.assert_close(got["1.running_mean"], start["1.running_mean"] + step * 2.0)  # buffers too
    assert got["1.num_batches_tracked"].item() == 5  # integers are copied
    for _ in range(200):
        average.update()
    assert average.updates == 201
    torch.testing.assert_close(got["0.weight"], model[0].weight.detach(), rtol=0, atol=1e-6)  # it has caught up
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())


def two_epochs(camvid: Path, out: Path, *extra: str) -> None:
    train_in_process("--data-root", str(camvid), "--out", str(out), *SMALL_TRAIN, "--epochs", "2",
                     "--optimizer", "sgd", "--lr", "0.05", "--save-every", "0", *extra)


def test_ema_weights_differ_from_the_trained_ones_and_are_validated_and_saved(camvid, tmp_path):
    two_epochs(camvid, tmp_path, "--ema", "0.5", "--best", "last")
    last = load_checkpoint(tmp_path / "last.pth")
    best = load_checkpoint(tmp_path / "best.pth")
    assert last["ema"]["updates"] == 4  # 2 steps an epoch
    averaged, trained = last["ema"]["model"], last["model"]
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained if trained[k].is_floating_point())
    # The val metrics of history.csv and results.json are those of best.pth's (averaged) weights
    model = inference.load_model(tmp_path / "best.pth", None, torch.device("cpu")).model
    run = train.setup(train.parse_args(["--data-root", str(camvid), "--out", str(tmp_path / "probe"), *SMALL_TRAIN]))
    metrics = inference.evaluate(model, run.val_loader, 11, torch.device("cpu"), None, True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ema"] == 0.5 and results["miou"] == pytest.approx(metrics["miou"], abs=1e-9)


def test_ema_off_saves_the_trained_weights(camvid, tmp_path):
    two_epochs(camvid, tmp_path, "--best", "last")
    last, best = (load_checkpoint(tmp_path / name) for name in ("last.pth", "best.pth"))
    assert last["ema"] is None and all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


# ---------------------------------------------------------------- --aux-weight

@pytest.mark.parametrize("variant, coarse", [("fcn8s", 2), ("fcn16s", 1)])
def test_aux_outputs_leave_the_logits_alone(variant, coarse):
    torch.manual_seed(0)
    model = FCN(FCNConfig(variant, "vgg16", 11, fc_width=16)).eval()
    for layer in (model.score_fr, model.score_pool4):
        nn.init.normal_(layer.weight, std=0.5)
    images = torch.randn(2, 3, 40, 70)  # not a multiple of 32: padded inside, cropped back
    logits, extra = model(images, aux=True)
    assert torch.equal(logits, model(images))
    assert len(extra) == coarse and all(scores.shape == logits.shape for scores in extra)
    assert all(not torch.equal(scores, logits) for scores in extra)


def gradients(aux_weight: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradients of one batch through backward, and the loss it reports."""
    torch.manual_seed(0)
    model = FCN(FCNConfig("fcn8s", "vgg16", 11, fc_width=16)).eval()  # eval: no dropout, the same forward twice
    for layer in (model.score_fr, model.score_pool4, model.score_pool3):
        nn.init.normal_(layer.weight, std=0.5)
    images, labels = torch.randn(2, 3, 32, 64), torch.randint(0, 11, (2, 32, 64))
    loop = Runtime(torch.device("cpu"), None, False, aux_weight=aux_weight)
    loss_fn = SegmentationLoss()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = backward(model, images, labels, scaler, loss_fn, loop, loss_fn.denominator(labels))
    return {name: p.grad.clone() for name, p in model.named_parameters()}, loss


def test_aux_loss_changes_the_coarse_heads_gradient_only():
    plain, plain_loss = gradients(0.0)
    supervised, supervised_loss = gradients(0.4)
    assert not torch.allclose(supervised["score_fr.weight"], plain["score_fr.weight"])
    assert not torch.allclose(supervised["score_pool4.weight"], plain["score_pool4.weight"])
    # The stride-8 skip and the final upsampler feed only the final output: their gradient is the plain one
    for name in ("score_pool3.weight", "upscore.weight"):
        torch.testing.assert_close(supervised[name], plain[name])
    assert torch.equal(supervised_loss, plain_loss)  # the logged loss is the final output's


def test_aux_weight_on_fcn32s_is_refused(camvid, tmp_path):
    with pytest.raises(UserError, match="--aux-weight: fcn32s has no coarser output"):
        train.setup(train.parse_args(["--data-root", str(camvid), "--out", str(tmp_path), *SMALL_TRAIN,
                                      "--model", "fcn32s", "--aux-weight", "0.4"]))


@pytest.mark.parametrize("flag, value, expected", [("--ema", "1", "--ema: expected a decay in [0, 1)"),
                                                   ("--aux-weight", "-1", "--aux-weight: expected a weight >= 0"),
                                                   ("--class-weight-cap", "-2", "--class-weight-cap: expected"),
                                                   ("--class-weight-power", "-1", "--class-weight-power: expected"),
                                                   ("--train-splits", "train,,val", "splits 'train,,val'"),
                                                   ("--train-splits", "train,nope", "nope: folder not found")])
def test_bad_lever_flags_are_one_line(camvid, tmp_path, flag, value, expected):
    with pytest.raises(UserError, match=re.escape(expected)) as error:
        train.setup(train.parse_args(["--data-root", str(camvid), "--out", str(tmp_path / "run"), *SMALL_TRAIN,
                                      flag, value]))
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- class weights

class Labels:
    """A dataset stub of label maps only: class 0 everywhere but a few pixels of classes 1 and 2."""

    def __init__(self):
        first = torch.zeros(2, 3, 100, dtype=torch.uint8)
        labels = torch.zeros(100, 100, dtype=torch.uint8)
        labels[0, :2] = 1  # 2 pixels of class 1
        labels[1, :40] = 2
        self.samples = [(first, labels), (first, torch.full((100, 100), 3, dtype=torch.uint8))]

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        return self.samples[index]


def test_capped_weights_never_exceed_the_cap(tmp_path):
    raw = class_weights(Labels(), 4, None, None)
    assert raw.max() == 20.0  # median-frequency balancing: 20x for the 2-pixel class
    capped = class_weights(Labels(), 4, 5.0, tmp_path / "class_weights.json")
    assert capped.max() == 5.0 and (capped <= 5.0).all()
    assert torch.equal(capped, raw.clamp(max=5.0))  # below the cap, SegNet's weights unchanged
    record = json.loads((tmp_path / "class_weights.json").read_text())
    assert record["cap"] == 5.0 and max(record["weights"]) == 5.0
    assert record["median_frequency"] == pytest.approx(raw.tolist())
    # Read back (a resume): the same capped weights, the cache file unchanged
    assert torch.equal(class_weights(Labels(), 4, 5.0, tmp_path / "class_weights.json"), capped)


def test_the_cap_reaches_the_loss(camvid, tmp_path):
    run = train.setup(train.parse_args(["--data-root", str(camvid), "--out", str(tmp_path), *SMALL_TRAIN,
                                        "--class-weights", "median-freq", "--class-weight-cap", "1.1"]))
    record = json.loads((tmp_path / "class_weights.json").read_text())
    assert max(record["median_frequency"]) > 1.1
    assert run.loss_fn.weight.max().item() == pytest.approx(1.1)


def test_the_power_softens_the_weights_before_the_cap(tmp_path):
    raw = class_weights(Labels(), 4, None, None)
    rooted = class_weights(Labels(), 4, 3.0, tmp_path / "class_weights.json", power=0.5)
    assert torch.allclose(rooted, raw.sqrt().clamp(max=3.0))  # the 20x class: sqrt 4.47, then the cap
    assert rooted.max() == 3.0 and rooted[0] == pytest.approx(raw[0].sqrt().item())
    record = json.loads((tmp_path / "class_weights.json").read_text())
    assert record["power"] == 0.5 and record["median_frequency"] == pytest.approx(raw.tolist())
    # Read back (a resume): the power applies to the recorded plain weights again
    assert torch.equal(class_weights(Labels(), 4, 3.0, tmp_path / "class_weights.json", power=0.5), rooted)


def test_the_power_reaches_the_loss(camvid, tmp_path):
    run = train.setup(train.parse_args(["--data-root", str(camvid), "--out", str(tmp_path), *SMALL_TRAIN,
                                        "--class-weights", "median-freq", "--class-weight-power", "0.5"]))
    plain = torch.tensor(json.loads((tmp_path / "class_weights.json").read_text())["median_frequency"])
    assert not torch.allclose(plain, plain.sqrt())
    assert torch.allclose(run.loss_fn.weight.cpu(), plain.sqrt().clamp(max=10.0))


# ---------------------------------------------------------------- --train-splits

def test_several_splits_pair_by_stem_once(camvid):
    both = CamVidDataset(camvid, "train,val", TABLE)
    train_set, val_set = CamVidDataset(camvid, "train", TABLE), CamVidDataset(camvid, "val", TABLE)
    assert both.pairs == train_set.pairs + val_set.pairs and len(both) == 7 and both.split == "train,val"
    assert len(CamVidDataset(camvid, "train,val", TABLE, limit=2)) == 4  # --limit: of each split
    assert parse_splits("train, val") == ("train", "val")
    with pytest.raises(UserError, match="distinct names"):
        parse_splits("train,train")


def test_a_stem_in_two_splits_is_refused(tmp_path):
    root = write_camvid(tmp_path / "CamVid", {"train": 2, "val": 1})
    for suffix, folder in (("", "val"), ("_L", "val_labels")):
        source = next((root / folder).glob(f"val_000{suffix}.*"))
        source.rename(source.with_name(f"train_001{suffix}{source.suffix}"))
    with pytest.raises(UserError, match="stem 'train_001' is also in split train"):
        CamVidDataset(root, "train,val", TABLE)


@pytest.mark.skipif(real_camvid() is None, reason="needs the real CamVid ($CAMVID_ROOT)")
def test_train_and_val_hold_468_pairs_on_camvid():
    root = real_camvid()
    table = ClassTable.from_csv(Path(root) / "class_dict.csv")
    assert len(CamVidDataset(root, "train,val", table)) == 468


@pytest.fixture
def worsening(monkeypatch):
    """Validation whose MIoU falls epoch after epoch: the best val epoch is the first."""
    evaluate, calls = engine.loop.evaluate, []

    def falling(*args, **kwargs):
        calls.append(1)
        return {**evaluate(*args, **kwargs), "miou": 0.5 - 0.1 * len(calls)}
    monkeypatch.setattr(engine.loop, "evaluate", falling)


def test_training_on_val_says_so_and_keeps_the_last_epoch(camvid, tmp_path, capsys, worsening):
    two_epochs(camvid, tmp_path, "--train-splits", "train,val")
    said = capsys.readouterr().out
    assert "val is trained on, so its scores are not held out" in said and "7 train, 3 val" in said
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["train_splits"] == ["train", "val"] and results["val_held_out"] is False
    assert results["best_pth"] == "last epoch" and results["best_epoch"] == 2
    assert load_checkpoint(tmp_path / "best.pth")["epoch"] == 2
    result = run_cli("test.py", "--weights", str(tmp_path / "best.pth"), "--data-root", str(camvid), "--split", "val",
                     "--workers", "0", "--device", "cpu", "--json", str(tmp_path / "val.json"))
    assert "was trained on val (--train-splits train,val): these scores are not held out" in result.stdout
    assert json.loads((tmp_path / "val.json").read_text())["held_out"] is False


def test_best_val_is_the_default_when_val_is_held_out(camvid, tmp_path, worsening):
    two_epochs(camvid, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["val_held_out"] is True and results["best_pth"] == "best val epoch"
    assert results["best_epoch"] == 1 and load_checkpoint(tmp_path / "best.pth")["epoch"] == 1
    settings = train.settings_from_args(train.parse_args(["--data-root", str(camvid), "--train-splits", "train,val",
                                                          "--best", "val"]))
    assert settings.data.val_trained_on and not settings.keep_last
