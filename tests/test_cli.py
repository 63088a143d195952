"""End to end on a tiny CamVid folder: train, resume, test --json, predict, checkpoints and bad input."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cfg
import utils
from conftest import SMALL_TRAIN, run_cli
from dataset import ClassTable, MaskEncoder, find_pairs, read_image
from evalution_segmentaion import ConfusionMatrix
from fcn import FCN, FCNConfig

TABLE = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)


def test_train_writes_run_files_and_resume_continues(trained_run):
    for name in ("last.pth", "best.pth", "history.csv", "curves.png", "val_samples.png", "results.json"):
        assert (trained_run / name).is_file(), name
    results = json.loads((trained_run / "results.json").read_text())
    assert results["split"] == "val" and results["epochs"] == 2 and results["pretrained"] is False
    assert set(results["iou"]) == set(TABLE.names) and results["command"].startswith("python train.py")
    with open(trained_run / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"lr", "train_loss", "val_loss", "val_pa", "val_mpa", "val_miou", "seconds", "iou_Sky"} <= set(rows[0])
    state = utils.load_checkpoint(trained_run / "last.pth")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert {"optimizer", "scheduler", "scaler", "best_miou", "config"} <= set(state)
    assert state["config"]["model"] == {"variant": "fcn8s", "backbone": "vgg16", "num_classes": 11, "fc_width": 16}
    assert state["best_miou"] == pytest.approx(max(float(r["val_miou"]) for r in rows))


def test_resume_when_already_done_says_so(trained_run, camvid):
    result = run_cli("train.py", "--data-root", str(camvid), "--out", str(trained_run), *SMALL_TRAIN,
                     "--epochs", "2", "--resume")
    assert "already has 2 epochs" in result.stdout


def test_test_json_matches_miou_from_predicted_masks(trained_run, camvid, tmp_path):
    weights = str(trained_run / "best.pth")
    report = tmp_path / "metrics.json"
    printed = run_cli("test.py", "--data-root", str(camvid), "--weights", weights, "--json", str(report),
                      "--workers", "0").stdout
    metrics = json.loads(report.read_text())
    assert {"pixel_accuracy", "mean_pixel_accuracy", "miou", "fwiou", "iou"} <= set(metrics)
    assert list(metrics["iou"]) == list(TABLE.names)
    assert f"MIoU  {metrics['miou']:.4f}" in printed and "Bicyclist" in printed
    # Independently: predict.py's colour masks, decoded and scored against the truth.
    masks = tmp_path / "masks"
    run_cli("predict.py", "--weights", weights, "--input", str(camvid / "test"), "--out", str(masks), "--overlay")
    confusion = ConfusionMatrix(TABLE.num_classes)
    encoder = MaskEncoder(TABLE)
    for stem, _, truth_path in find_pairs(camvid, "test"):
        predicted = encoder(np.asarray(Image.open(masks / f"{stem}.png").convert("RGB")))
        truth = encoder(np.asarray(Image.open(truth_path).convert("RGB")))
        confusion.update(torch.from_numpy(predicted), torch.from_numpy(truth))
        assert (masks / f"{stem}_overlay.png").is_file()
    assert confusion.compute()["miou"] == pytest.approx(metrics["miou"], abs=1e-9)


def test_predict_any_size_greyscale_rgba_and_skips_non_images(trained_run, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("L", (50, 37), 90).save(inputs / "grey.png")
    Image.new("RGBA", (41, 33), (1, 2, 3, 200)).save(inputs / "rgba.png")
    (inputs / "notes.txt").write_text("not an image")
    result = run_cli("predict.py", "--weights", str(trained_run / "last.pth"), "--input", str(inputs),
                     "--out", str(tmp_path / "out"))
    assert "skipped" in result.stderr and "notes.txt" in result.stderr
    assert Image.open(tmp_path / "out" / "grey.png").size == (50, 37)
    colours = set(map(tuple, np.asarray(Image.open(tmp_path / "out" / "rgba.png")).reshape(-1, 3).tolist()))
    assert colours <= set(map(tuple, TABLE.colors.tolist()))


def test_predict_nothing_readable_exits_non_zero(trained_run, tmp_path):
    (tmp_path / "a.txt").write_text("x")
    result = run_cli("predict.py", "--weights", str(trained_run / "last.pth"), "--input", str(tmp_path / "a.txt"),
                     "--out", str(tmp_path / "out"), check=False)
    assert result.returncode != 0 and "none of the 1 file(s)" in result.stderr


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_inputs_give_one_clear_line(trained_run, camvid, tmp_path):
    one_line_error(run_cli("train.py", "--data-root", str(tmp_path / "nope"), check=False), "--data-root", "not found")
    one_line_error(run_cli("test.py", "--data-root", str(camvid), "--weights", str(tmp_path / "x.pth"), check=False),
                   "x.pth", "checkpoint not found")
    one_line_error(run_cli("train.py", "--data-root", str(camvid), "--epochs", "0", check=False), "--epochs")
    one_line_error(run_cli("train.py", "--data-root", str(camvid), "--out", str(tmp_path / "fresh"), "--resume",
                           check=False), "last.pth", "not found")
    if not torch.cuda.is_available():
        one_line_error(run_cli("test.py", "--data-root", str(camvid), "--weights", str(trained_run / "last.pth"),
                               "--device", "cuda", check=False), "--device cuda")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    one_line_error(run_cli("predict.py", "--weights", str(garbage), "--input", str(camvid / "test"),
                           "--out", str(tmp_path / "o"), check=False), "garbage.pth", "not a readable checkpoint")


def test_checkpoint_of_another_class_count(camvid, tmp_path):
    model = FCN(FCNConfig("fcn8s", "vgg16", num_classes=5, fc_width=8))
    path = tmp_path / "five.pth"
    utils.save_checkpoint({"model": model.state_dict(), "config": {"model": model.config.to_dict()}}, path)
    one_line_error(run_cli("test.py", "--data-root", str(camvid), "--weights", str(path), check=False),
                   "5 classes", "11")


def test_unknown_label_colour_stops_training(tmp_path):
    from conftest import write_camvid
    root = write_camvid(tmp_path / "CamVid", {"train": 2, "val": 1})
    mask_path = root / "train_labels" / "train_001_L.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[:2, :2] = (7, 7, 7)
    Image.fromarray(mask).save(mask_path)
    result = run_cli("train.py", "--data-root", str(root), "--out", str(tmp_path / "run"), *SMALL_TRAIN,
                     "--epochs", "1", check=False)
    assert result.returncode != 0
    assert "train_001_L.png: colour (7, 7, 7) on 4 pixels not in class_dict.csv" in result.stderr
    assert not (tmp_path / "run" / "last.pth").exists()


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    model = FCN(FCNConfig("fcn16s", "vgg16_bn", num_classes=11, fc_width=8))
    path = tmp_path / "c.pth"
    utils.save_checkpoint({"model": model.state_dict(), "config": {"model": model.config.to_dict()}, "epoch": 3}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temporary file left behind
    state = utils.load_checkpoint(path)
    restored = utils.model_from_checkpoint(state, TABLE, path)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)

    def crash(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        utils.atomic_write(path, crash)
    assert utils.load_checkpoint(path)["epoch"] == 3  # the old file survived intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]
    assert read_image  # imported for the module's public API check below


def test_scripts_import_without_side_effects():
    import importlib
    for name in ("train", "test", "predict", "dataset", "fcn", "evalution_segmentaion", "cfg"):
        module = importlib.import_module(name)
        if hasattr(module, "get_args_parser"):
            assert module.get_args_parser().prog


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(trained_run, camvid, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = (run_dir / "last.pth").read_bytes()
    state = utils.load_checkpoint(trained_run / "last.pth")
    state["model"]["score_fr.weight"].fill_(float("nan"))  # poisoned weights: the first loss is NaN
    utils.save_checkpoint({"model": state["model"], "config": state["config"]}, tmp_path / "nan.pth")
    result = run_cli("train.py", "--data-root", str(camvid), "--out", str(run_dir), *SMALL_TRAIN,
                     "--epochs", "1", "--init-from", str(tmp_path / "nan.pth"), check=False)
    assert result.returncode == 1, result.stderr
    assert "loss became NaN/inf in epoch 1" in result.stderr and "last good checkpoint is intact" in result.stderr
    assert (run_dir / "last.pth").read_bytes() == before
