"""Segmentation metrics from one confusion matrix accumulated over a whole split."""
from __future__ import annotations

import torch
import torch.distributed as dist

import cfg


class ConfusionMatrix:
    """rows = truth, columns = prediction; pixels labelled ignore_index are never counted."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = cfg.IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        # One spare bin at the end collects ignored pixels, so update() needs no boolean
        # indexing: that would force a device->host sync on every batch.
        self.counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true label maps (same shape, any integer dtype)."""
        n = self.num_classes
        target, prediction = target.long().flatten(), prediction.long().flatten()
        valid = (target != self.ignore_index) & (target >= 0) & (target < n)
        cell = torch.where(valid, target * n + prediction, n * n)
        self.counts.index_add_(0, cell, torch.ones_like(cell))  # a bincount without the host sync

    @property
    def matrix(self) -> torch.Tensor:
        """num_classes × num_classes counts (truth × prediction)."""
        return self.counts[:-1].view(self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        """Sum the counts of every process (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    def compute(self) -> dict:
        """PA, MPA, per-class IoU and accuracy, MIoU and FWIoU as Python floats."""
        return metrics_from_confusion(self.matrix.double().cpu())


def metrics_from_confusion(matrix: torch.Tensor) -> dict:
    """All metrics from a truth × prediction count matrix; classes absent from truth and prediction are NaN
    in the per-class lists and left out of the means (nanmean)."""
    matrix = matrix.double()
    true_positive = matrix.diag()
    truth_total, predicted_total = matrix.sum(1), matrix.sum(0)
    union = truth_total + predicted_total - true_positive
    iou = true_positive / union  # 0/0 -> NaN for a class absent from both
    class_accuracy = true_positive / truth_total
    total = matrix.sum()
    frequency = truth_total / total
    seen = truth_total > 0
    return {
        "pixel_accuracy": float(true_positive.sum() / total),
        "mean_pixel_accuracy": float(class_accuracy.nanmean()),
        "miou": float(iou.nanmean()),
        "fwiou": float((frequency[seen] * iou[seen].nan_to_num()).sum()),
        "iou": iou.tolist(),
        "class_accuracy": class_accuracy.tolist(),
    }
