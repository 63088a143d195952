"""Metrics against hand counts; one confusion matrix over the whole split."""
import json
import math

import pytest
import torch
from conftest import reactive_checkpoint

import cfg
from engine.loop import evaluate
from engine.run import Runtime
from evalution_segmentaion import ConfusionMatrix, metrics_from_confusion

V = cfg.IGNORE_INDEX


def test_hand_counted_example_with_absent_class():
    # 3 classes; class 2 appears in neither truth nor prediction -> NaN, left out of the means.
    truth = torch.tensor([[0, 0, 1, V], [1, 1, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 0, 0, 0]])
    confusion = ConfusionMatrix(3)
    confusion.update(pred, truth)
    assert confusion.matrix.tolist() == [[3, 1, 0], [1, 2, 0], [0, 0, 0]]  # the void pixel is not counted
    m = confusion.compute()
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)
    assert m["class_accuracy"][:2] == pytest.approx([3 / 4, 2 / 3]) and math.isnan(m["class_accuracy"][2])
    assert m["iou"][:2] == pytest.approx([3 / 5, 2 / 4]) and math.isnan(m["iou"][2])
    assert m["mean_pixel_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert m["miou"] == pytest.approx((3 / 5 + 2 / 4) / 2)
    assert m["fwiou"] == pytest.approx(4 / 7 * 3 / 5 + 3 / 7 * 2 / 4)


def test_class_predicted_but_absent_from_truth_scores_zero():
    m = metrics_from_confusion(torch.tensor([[1, 1], [0, 0]]))
    assert m["iou"] == pytest.approx([0.5, 0.0])
    assert m["miou"] == pytest.approx(0.25)
    assert math.isnan(m["class_accuracy"][1]) and m["mean_pixel_accuracy"] == pytest.approx(0.5)


def test_accumulates_over_the_split_not_per_batch():
    torch.manual_seed(0)
    truth = torch.randint(0, 4, (6, 9, 11))
    pred = torch.randint(0, 4, (6, 9, 11))
    truth[0, 0] = V
    whole, batched = ConfusionMatrix(4), ConfusionMatrix(4)
    whole.update(pred, truth)
    for i in range(6):
        batched.update(pred[i:i + 1], truth[i:i + 1])
    assert torch.equal(whole.matrix, batched.matrix)
    # The per-batch average of MIoU is a different (wrong) number: the protocol forbids it.
    per_batch = []
    for i in range(6):
        single = ConfusionMatrix(4)
        single.update(pred[i], truth[i])
        per_batch.append(single.compute()["miou"])
    assert sum(per_batch) / 6 != pytest.approx(whole.compute()["miou"], abs=1e-9)


def test_matches_a_reference_bincount():
    torch.manual_seed(1)
    truth = torch.randint(0, 5, (1000,))
    pred = torch.randint(0, 5, (1000,))
    confusion = ConfusionMatrix(5)
    confusion.update(pred.to(torch.uint8), truth.to(torch.uint8))
    reference = torch.bincount(truth * 5 + pred, minlength=25).view(5, 5)
    assert torch.equal(confusion.matrix, reference)


class EchoModel(torch.nn.Module):
    """Logits one-hot on the class written (as a grey level) into the image: predictions chosen by the test."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = images[:, 0] * (cfg.IMAGENET_STD[0] * 255) + cfg.IMAGENET_MEAN[0] * 255  # undo normalize_batch
        return torch.nn.functional.one_hot(grey.round().long(), 3).permute(0, 3, 1, 2).float()


# Three 2x2 images: (truth, prediction). Counted by hand, rows truth, columns prediction:
#   image 1: (0,0) (0,1) (1,1), void   image 2: (1,1) (1,2) (2,2) (2,2)   image 3: (2,2) (0,0) (0,1), void
#   -> [[2, 2, 0], [0, 2, 1], [0, 0, 3]]: 10 labelled pixels, 7 right; truth totals 4 3 3, predicted 2 4 4.
SPLIT = [([[0, 0], [1, V]], [[0, 1], [1, 2]]),
         ([[1, 1], [2, 2]], [[1, 2], [2, 2]]),
         ([[2, 0], [0, V]], [[2, 0], [1, 0]])]


def echo_loader(batch_size: int) -> torch.utils.data.DataLoader:
    items = [(torch.tensor(pred, dtype=torch.uint8).expand(3, 2, 2).contiguous(),
              torch.tensor(truth, dtype=torch.uint8)) for truth, pred in SPLIT]
    return torch.utils.data.DataLoader(items, batch_size)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_evaluate_counts_every_batch_of_the_split(batch_size):
    m = evaluate(EchoModel(), echo_loader(batch_size), 3, Runtime(torch.device("cpu"), None, False))
    assert m["pixel_accuracy"] == pytest.approx(7 / 10)
    assert m["iou"] == pytest.approx([2 / 4, 2 / 5, 3 / 4])  # 2 / (4 + 2 - 2), 2 / (3 + 4 - 2), 3 / (3 + 4 - 3)
    assert m["class_accuracy"] == pytest.approx([2 / 4, 2 / 3, 3 / 3])
    assert m["miou"] == pytest.approx(0.55) and m["mean_pixel_accuracy"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["fwiou"] == pytest.approx(0.4 * 0.5 + 0.3 * 0.4 + 0.3 * 0.75)  # weighted by truth totals
    right, wrong = math.log((math.e + 2) / math.e), math.log(math.e + 2)  # cross-entropy of a one-hot logit
    assert m["loss"] == pytest.approx((7 * right + 3 * wrong) / 10)  # per labelled pixel over the split


def perturbed_checkpoint(path):
    """A narrow FCN-8s whose scoring layers are random, so its predictions differ from image to image."""
    return reactive_checkpoint(path, "vgg16", fc_width=8)


def test_test_py_scores_every_image_of_the_split(camvid, tmp_path, monkeypatch):
    import test
    import transforms
    from dataset import CamVidDataset, ClassTable, normalize_batch
    model = perturbed_checkpoint(tmp_path / "w.pth")
    monkeypatch.setattr(cfg, "CROP_SIZE", (32, 64))  # --crop's centre crop, shrunk to fit the 64x96 fixture
    table = ClassTable.from_csv(camvid / "class_dict.csv")
    for crop in (None, transforms.CenterCrop(cfg.CROP_SIZE)):
        expected = ConfusionMatrix(11)  # image by image, the crop applied by hand
        with torch.no_grad():
            for image, labels in CamVidDataset(camvid, "test", table, crop):
                expected.update(model(normalize_batch(image[None]))[0].argmax(0), labels)
        assert len(set(expected.matrix.argmax(1).tolist())) > 1  # the predictions do vary
        # 3 images in batches of 2: the last batch is short
        test.main(test.get_args_parser().parse_args([
            "--data-root", str(camvid), "--weights", str(tmp_path / "w.pth"), "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "--no-amp", "--json", str(tmp_path / "m.json"), *(["--crop"] if crop else [])]))
        metrics = json.loads((tmp_path / "m.json").read_text())
        assert metrics["miou"] == pytest.approx(expected.compute()["miou"], abs=1e-12)
        assert metrics["pixel_accuracy"] == pytest.approx(expected.compute()["pixel_accuracy"], abs=1e-12)
