"""Integration on a few real CamVid images: $CAMVID_ROOT, else data/CamVid when it holds a complete CamVid
(a full download with 233 test images or a copy with a test sample); skipped when there is neither."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cfg
import dataset
import predict
import test as test_script
from conftest import SMALL_TRAIN, real_camvid, train_in_process
from dataset import CamVidDataset, ClassTable, MaskEncoder, find_pairs
from evalution_segmentaion import ConfusionMatrix

ROOT = real_camvid()
pytestmark = pytest.mark.skipif(not ROOT, reason="no real CamVid: CAMVID_ROOT is not set and data/CamVid holds none")


def tree(root: str) -> dict[str, int]:
    """Every path under root (relative) and its modification time."""
    return {os.path.relpath(os.path.join(folder, name), root): os.stat(os.path.join(folder, name)).st_mtime_ns
            for folder, folders, files in os.walk(root) for name in folders + files}


def test_real_splits_pair_and_encode():
    table = ClassTable.from_csv(Path(ROOT) / "class_dict.csv")
    assert len(find_pairs(ROOT, "train")) == 367 and len(find_pairs(ROOT, "val")) == 101
    assert 1 <= len(find_pairs(ROOT, "test")) <= 233  # a full download or a sample
    image, labels = CamVidDataset(ROOT, "val", table, limit=1)[0]
    assert image.shape == (3, *cfg.EVAL_SIZE) and labels.shape == cfg.EVAL_SIZE


def test_download_leaves_the_real_camvid_as_it_is(capsys):
    before = tree(ROOT)
    dataset.main(dataset.get_args_parser().parse_args(["--download", ROOT]))
    assert f"{Path(ROOT)} already holds CamVid (train 367, val 101, test " in capsys.readouterr().out
    assert tree(ROOT) == before


def test_train_test_predict_on_real_images(tmp_path):
    out = tmp_path / "run"
    train_in_process("--data-root", ROOT, "--out", str(out), *SMALL_TRAIN, "--limit", "2", "--epochs", "1",
                     "--downscale", "4")
    report = tmp_path / "test.json"
    test_script.main(test_script.get_args_parser().parse_args(
        ["--data-root", ROOT, "--weights", str(out / "best.pth"), "--split", "test", "--limit", "2",
         "--json", str(report), "--workers", "0", "--batch-size", "1"]))
    metrics = json.loads(report.read_text())
    assert metrics["label_size"] == list(cfg.EVAL_SIZE) and metrics["scale"] == 0.25  # the benchmark's labels
    pairs = find_pairs(ROOT, "test")[:2]
    predict.main(predict.get_args_parser().parse_args(
        ["--weights", str(out / "best.pth"), "--input", *(str(image) for _, image, _ in pairs),
         "--out", str(tmp_path / "masks"), "--workers", "0"]))
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == sorted(f"{stem}.png" for stem, _, _ in pairs)
    # test.py's numbers, recomputed from predict.py's colour masks of the same two images and their truth
    table = ClassTable.from_csv(Path(ROOT) / "class_dict.csv")
    encoder, confusion = MaskEncoder(table), ConfusionMatrix(table.num_classes)

    def labels(path):
        return torch.from_numpy(encoder(np.asarray(Image.open(path).convert("RGB"))))
    for stem, _, truth in pairs:
        confusion.update(labels(tmp_path / "masks" / f"{stem}.png"), labels(truth))
    expected = confusion.compute()
    assert metrics["images"] == 2 and list(metrics["iou"]) == list(table.names)
    assert metrics["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert metrics["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-9)
