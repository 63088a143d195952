"""The training loss: cross-entropy that ignores void, optionally class-weighted (median-frequency balancing,
capped), with online hard-pixel mining, and deep supervision of FCN's coarser outputs."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cfg
from engine.checkpoints import atomic_write


class SegmentationLoss(nn.Module):
    """Cross-entropy ignoring void, optionally class-weighted and/or with online hard-pixel mining.

    The loss is a sum over pixels divided by a denominator that depends on the labels alone (the labelled
    pixels' class weights, or with mining the kept pixels' count), so K accumulated batches that share the
    denominator of their union give the gradient of one batch K times larger, void pixels or not."""

    def __init__(self, weight: torch.Tensor | None = None, ohem_fraction: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ohem_fraction = ohem_fraction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.total(logits, labels) / safe_denominator(self.denominator(labels))

    def total(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed (weighted) per-pixel loss; void pixels add 0."""
        losses = F.cross_entropy(logits, labels, weight=self.weight, ignore_index=cfg.IGNORE_INDEX,
                                 reduction="none")
        if self.ohem_fraction <= 0:
            return losses.sum()
        # Keep the hardest fraction of pixels; topk with a fixed k needs no host sync. Void pixels
        # have loss 0, so they sort last and are left out of the count (see denominator).
        return losses.flatten().topk(self.kept(labels)).values.sum()

    def denominator(self, labels: torch.Tensor) -> torch.Tensor:
        """What the mean divides by: the class weights of the labelled pixels (their count when unweighted),
        with mining the count of kept labelled pixels. 0 for an all-void batch."""
        labelled = labels != cfg.IGNORE_INDEX
        if self.ohem_fraction > 0:
            return labelled.sum().clamp(max=self.kept(labels)).float()
        if self.weight is None:
            return labelled.sum().float()
        # Indexing with a clamped label instead of a boolean mask: no host sync on CUDA
        return torch.where(labelled, self.weight[labels.clamp(max=len(self.weight) - 1)], 0).sum()

    def kept(self, labels: torch.Tensor) -> int:
        """How many pixels hard-pixel mining keeps in a batch."""
        return max(1, int(labels.numel() * self.ohem_fraction))

    def supervised(self, output: torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]], labels: torch.Tensor,
                   aux_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss to back-propagate and the final output's own: with deep supervision (`output` is the
        model's (logits, coarse logits)) each coarser output adds aux_weight × its loss, in fp32 like the rest."""
        logits, coarse = output if isinstance(output, tuple) else (output, [])
        main = self.total(logits.float(), labels)
        total = main
        for scores in coarse:
            total = total + aux_weight * self.total(scores.float(), labels)
        return total, main


def safe_denominator(denominator: torch.Tensor) -> torch.Tensor:
    """A denominator safe to divide by: an all-void batch has a zero loss sum and must add 0, not NaN."""
    return denominator.clamp(min=torch.finfo(torch.float32).tiny)


def median_frequency_weights(dataset, num_classes: int) -> torch.Tensor:
    """SegNet's median-frequency balancing: weight_c = median(freq) / freq_c, where freq_c is the pixel
    count of c over the pixels of the images that contain c (0 for a class absent from every mask)."""
    pixels, image_pixels = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    for index in range(len(dataset)):
        labels = dataset.load(index)[1].long()
        counts = torch.bincount(labels[labels != cfg.IGNORE_INDEX], minlength=num_classes)[:num_classes].double()
        pixels += counts
        image_pixels += (counts > 0) * labels.numel()
    frequency = pixels / image_pixels.clamp(min=1)
    present = frequency > 0
    weights = torch.where(present, frequency[present].median() / frequency.clamp(min=1e-12), torch.zeros(()))
    return weights.float()


def class_weights(dataset, num_classes: int, cap: float | None, cache: Path | None, power: float = 1.0) -> torch.Tensor:
    """Median-frequency weights raised to `power` (1: SegNet's; 0.5: their square root, milder) and capped at
    `cap` (None: uncapped), so a class of a few pixels cannot dominate the loss. `cache` (class_weights.json beside
    the run) records the weights, the plain median-frequency ones, the power and the cap; a resume reads the plain
    ones back instead of reading every mask again."""
    if cache is not None and cache.is_file():
        record = json.loads(cache.read_text())
        balanced = torch.tensor(record.get("median_frequency", record["weights"]))  # older files: one uncapped list
    else:
        balanced = median_frequency_weights(dataset, num_classes)
    weights = balanced.pow(power)
    weights = weights.clamp(max=cap) if cap is not None else weights
    if cache is not None and not cache.is_file():  # atomic: other ranks may read it while rank 0 writes
        record = {"weights": weights.tolist(), "median_frequency": balanced.tolist(), "power": power, "cap": cap}
        atomic_write(cache, lambda tmp: tmp.write_text(json.dumps(record)))
    return weights
