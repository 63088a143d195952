"""The pictures a run draws: loss and metric curves, and photo | truth | prediction grids with a colour legend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dataset import ClassTable, colorize
from engine.checkpoints import atomic_write


def plot_curves(rows: list[dict], path: str | Path) -> None:
    """Loss and validation metric curves per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validated = [row for row in rows if row["val_miou"] is not None]  # --eval-every skips some epochs
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([row["epoch"] for row in rows], [row["train_loss"] for row in rows], label="train")
    loss_axis.plot([row["epoch"] for row in validated], [row["val_loss"] for row in validated], label="val")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for key, label in (("val_miou", "MIoU"), ("val_pa", "PA"), ("val_mpa", "MPA")):
        metric_axis.plot([row["epoch"] for row in validated], [row[key] for row in validated], label=label)
    metric_axis.set(xlabel="epoch", ylim=(0, 1), title="validation")
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))
    plt.close(figure)


def sample_grid(images: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor, table: ClassTable) -> Image.Image:
    """Rows of photo | truth | prediction for a few samples (uint8 N×3×H×W images, N×H×W labels), and below
    them the colour of every class."""
    rows = []
    for image, target, predicted in zip(images.cpu(), truth.cpu().numpy(), prediction.cpu().numpy()):
        rows.append(np.concatenate([image.permute(1, 2, 0).numpy(), colorize(target, table),
                                    colorize(predicted, table)], axis=1))
    grid = np.concatenate(rows, axis=0)
    return Image.fromarray(np.concatenate([grid, legend(table, grid.shape[1])], axis=0))


def legend(table: ClassTable, width: int) -> np.ndarray:
    """H×width×3 uint8: a swatch and the name of each class (and void), wrapped into as many lines as needed."""
    entries = list(zip(table.names, table.colors.tolist()))
    if len(table.void_colors):
        entries.append(("void", table.void_colors[0].tolist()))
    line_height, swatch, gap, char_width = 14, 10, 10, 6  # PIL's default bitmap font is about 6 px a character
    lines, x = [[]], 0
    for name, color in entries:
        needed = swatch + 3 + char_width * len(name) + gap
        if x + needed > width and lines[-1]:
            lines.append([])
            x = 0
        lines[-1].append((x, name, color))
        x += needed
    canvas = Image.new("RGB", (width, line_height * len(lines) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        top = 2 + row * line_height
        for left, name, color in line:
            draw.rectangle([left + 2, top + 1, left + 2 + swatch, top + 1 + swatch], fill=tuple(color), outline="black")
            draw.text((left + swatch + 5, top), name, fill="black")
    return np.asarray(canvas)


def write_samples(images: torch.Tensor, labels: torch.Tensor, prediction: torch.Tensor, table: ClassTable,
                  path: Path) -> None:
    """val_samples.png: a few val images with truth and prediction side by side."""
    grid = sample_grid(images, labels, prediction, table)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
