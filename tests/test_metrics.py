"""Metrics against hand counts; one confusion matrix over the whole split."""
import math

import pytest
import torch

import cfg
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
