"""Integration on a few real CamVid images from $CAMVID_ROOT (skipped when unset)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cfg
import predict
import test as test_script
from conftest import SMALL_TRAIN, train_in_process
from dataset import CamVidDataset, ClassTable, MaskEncoder, find_pairs
from evalution_segmentaion import ConfusionMatrix

ROOT = os.environ.get("CAMVID_ROOT")
pytestmark = pytest.mark.skipif(not ROOT, reason="CAMVID_ROOT is not set")


def test_real_splits_pair_and_encode():
    table = ClassTable.from_csv(Path(ROOT) / "class_dict.csv")
    assert len(find_pairs(ROOT, "train")) == 367 and len(find_pairs(ROOT, "val")) == 101
    image, labels = CamVidDataset(ROOT, "val", table, limit=1)[0]
    assert image.shape == (3, *cfg.EVAL_SIZE) and labels.shape == cfg.EVAL_SIZE


def test_train_test_predict_on_real_images(tmp_path):
    out = tmp_path / "run"
    train_in_process("--data-root", ROOT, "--out", str(out), *SMALL_TRAIN, "--limit", "2", "--epochs", "1",
                     "--downscale", "4")
    report = tmp_path / "test.json"
    test_script.main(test_script.get_args_parser().parse_args(
        ["--data-root", ROOT, "--weights", str(out / "best.pth"), "--split", "test", "--limit", "2",
         "--json", str(report), "--workers", "0", "--batch-size", "1"]))
    metrics = json.loads(report.read_text())
    predict.main(predict.get_args_parser().parse_args(
        ["--weights", str(out / "best.pth"), "--input", str(Path(ROOT) / "test"), "--out", str(tmp_path / "masks"),
         "--workers", "0"]))
    assert len(list((tmp_path / "masks").glob("*.png"))) == 4
    # test.py's numbers, recomputed from predict.py's colour masks of the same two images and their truth
    table = ClassTable.from_csv(Path(ROOT) / "class_dict.csv")
    encoder, confusion = MaskEncoder(table), ConfusionMatrix(table.num_classes)

    def labels(path):
        return torch.from_numpy(encoder(np.asarray(Image.open(path).convert("RGB"))))
    for stem, _, truth in find_pairs(ROOT, "test")[:2]:
        confusion.update(labels(tmp_path / "masks" / f"{stem}.png"), labels(truth))
    expected = confusion.compute()
    assert metrics["images"] == 2 and list(metrics["iou"]) == list(table.names)
    assert metrics["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert metrics["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-9)
