"""Evaluate a checkpoint on CamVid: PA, MPA, MIoU, FWIoU, per-class IoU, confusion. `python test.py --help`."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

import cfg
import devices
import inference
from cfg import UserError
from dataset import (CamVidDataset, add_label_cache_args, check_data_root, label_cache_at,
                     resolve_class_dict)
from engine.checkpoints import atomic_write
from engine.plots import write_samples
from transforms import eval_transform


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate an FCN checkpoint on a CamVid split: by default on the "
                                     "full-resolution labels, the model run at the scale it was trained at.",
                                     formatter_class=cfg.HelpFormatter)
    add = parser.add_argument
    add("--data-root", default=cfg.default_data_root(),
        help="CamVid folder: $CAMVID_ROOT when set, else data/CamVid in the working folder")
    add("--class-dict", default=None, help="override the checkpoint's class colours with this class_dict.csv (same "
        "class names); without it: the checkpoint's own table")
    add("--split", default="test", choices=("test", "val"), help="the split to score")
    add("--weights", required=True, help="checkpoint written by train.py (best.pth or last.pth) or an exported .onnx")
    add("--limit", type=int, help="only the first K images (by stem)")
    add("--crop", action="store_true", help="score the 352x480 centre crop instead of the full 360x480 image")
    add("--downscale", type=float, default=1.0,
        help="score labels shrunk by this factor (images too; the model still runs at its own scale): 1 is the "
             "benchmark's 360x480, 4 the 90x120 that a --recipe camvid-cpu run validated on")
    add("--json", type=Path, help="also write the metrics (confusion matrix included) to this JSON file")
    add("--report", type=Path, metavar="DIR",
        help="write confusion.csv, confusion.png, per_class.csv and samples.png (3 images: photo, truth, prediction) here")
    add("--tta", help="test-time augmentation: flip and/or scales, e.g. flip or flip,0.75,1,1.25")
    add("--scale", type=float,
        help="resize the images by this factor before the model (relative to the images as scored, after "
             "--downscale), overriding the checkpoint's scale; without it: the one that brings them to the scale "
             "the checkpoint was trained at, times its test scale (--downscale / its train.py --downscale x its "
             "--test-scale), e.g. 0.3125 for a --recipe camvid-cpu model on 360x480 labels")
    add("--batch-size", type=int, default=4, help="images per forward pass")
    add("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu or cuda")
    add("--workers", type=int, default=devices.default_workers(), help="data loader processes (see train.py --help)")
    add("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="mixed precision: bf16/fp16 on CUDA, bf16 on CPUs with native bf16")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format")
    add_label_cache_args(parser)
    return parser


def report(metrics: dict, names: tuple[str, ...]) -> str:
    """The summary lines and the per-class table."""
    table = pd.DataFrame({"IoU": metrics["iou"], "accuracy": metrics["class_accuracy"]}, index=list(names))
    lines = [f"PA    {metrics['pixel_accuracy']:.4f}", f"MPA   {metrics['mean_pixel_accuracy']:.4f}",
             f"MIoU  {metrics['miou']:.4f}", f"FWIoU {metrics['fwiou']:.4f}", "",
             table.to_string(float_format=lambda v: f"{v:.4f}")]
    return "\n".join(lines)


def write_report(folder: Path, metrics: dict, names: tuple[str, ...]) -> None:
    """confusion.csv (counts, rows = truth), confusion.png (row-normalised heatmap), per_class.csv (main adds
    samples.png: three images with truth and prediction at the scored size)."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = metrics["confusion"].numpy()
    frame = pd.DataFrame(counts, index=pd.Index(names, name="truth \\ predicted"), columns=list(names))
    atomic_write(folder / "confusion.csv", lambda tmp: frame.to_csv(tmp))
    per_class = pd.DataFrame({"IoU": metrics["iou"], "accuracy": metrics["class_accuracy"],
                              "pixels": counts.sum(1)}, index=pd.Index(names, name="class"))
    atomic_write(folder / "per_class.csv", lambda tmp: per_class.to_csv(tmp))
    plot_confusion(counts, names, folder / "confusion.png")


def plot_confusion(counts: np.ndarray, names: tuple[str, ...], path: Path) -> None:
    """Heatmap of each truth row as fractions of its pixels, the fraction printed in every cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = 2 + 0.45 * len(names)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(names)), names, rotation=90)
    axis.set_yticks(range(len(names)), names)
    axis.set(xlabel="predicted", ylabel="truth", title="confusion (each row sums to 1)")
    for (row, col), value in np.ndenumerate(rows):
        axis.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


@dataclass(frozen=True)
class Scoring:
    """At what size test.py scores and at what scale the model runs, for the one line it prints."""

    label_size: tuple[int, int]  # (H, W) of the labels scored (of the first image)
    scale: float  # the model's input size / the label size
    scale_source: str  # why this scale: the checkpoint's training scale or --scale

    def describe(self, split: str, images: int, crop: bool) -> str:
        """'val: 101 images, scored on 360x480 labels; model input 0.25x (90x120, ...)'."""
        height, width = self.label_size
        size = f"{round(height * self.scale)}x{round(width * self.scale)}"
        resampled = "" if self.scale == 1 else ", logits resized to the labels"
        return (f"{split}: {images} images, scored on {height}x{width} labels{' (centre crop)' if crop else ''}; "
                f"model input {self.scale:g}x ({size}, {self.scale_source}){resampled}")


def json_result(metrics: dict, names: tuple[str, ...], args: argparse.Namespace, images: int,
                scoring: Scoring, trained_splits: tuple[str, ...]) -> dict:
    """What --json writes: the metrics, the confusion matrix and how they were made."""
    return {"pixel_accuracy": metrics["pixel_accuracy"], "mean_pixel_accuracy": metrics["mean_pixel_accuracy"],
            "miou": metrics["miou"], "fwiou": metrics["fwiou"], "iou": dict(zip(names, metrics["iou"])),
            "class_accuracy": dict(zip(names, metrics["class_accuracy"])), "split": args.split,
            "images": images, "pixels": metrics["pixels"], "confusion": metrics["confusion"].tolist(),
            "tta": inference.parse_tta(args.tta).to_dict(), "label_size": list(scoring.label_size),
            "scale": scoring.scale, "downscale": args.downscale, "weights": str(args.weights),
            "precision": metrics["precision"], "held_out": args.split not in trained_splits,
            "seconds": metrics["seconds"]}


def scoring_of(trained: inference.Trained, dataset: CamVidDataset, args: argparse.Namespace) -> Scoring:
    """The label size of the split as transformed, and the model's input scale relative to it."""
    source = "--scale" if args.scale is not None else (
        (f"the checkpoint's training scale, 1/{trained.downscale:g} of CamVid's" if trained.downscale != 1
         else "the checkpoint's training scale")
        + (f", x its test scale {trained.test_scale:g}" if trained.test_scale != 1 else ""))
    return Scoring(tuple(dataset[0][1].shape), trained.input_scale(args.downscale, args.scale), source)


def main(args: argparse.Namespace) -> dict:
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size and --limit must be positive integers")
    if args.downscale <= 0:
        raise UserError(f"--downscale: expected a positive factor, got {args.downscale}")
    tta = inference.parse_tta(args.tta)
    check_data_root(args.data_root)
    device = devices.resolve_device(args.device)
    trained = inference.load_model(args.weights, args.class_dict, device, resolve_class_dict(args.data_root))
    model, table = trained.model, trained.table
    transform = eval_transform(cfg.CROP_SIZE if args.crop else None, args.downscale)
    dataset = CamVidDataset(args.data_root, args.split, table, transform, args.limit,
                            label_cache=label_cache_at(args.label_cache, args.no_label_cache))
    scoring = scoring_of(trained, dataset, args)
    loader = DataLoader(dataset, args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    amp = devices.amp_dtype(device, args.amp)
    started = time.perf_counter()
    metrics = inference.evaluate(model, loader, table.num_classes, device, amp, args.channels_last, tta,
                                 scoring.scale, progress=True)
    metrics["seconds"] = time.perf_counter() - started  # decoding, the model and scoring; not start-up
    metrics["precision"] = "fp32" if getattr(model, "is_onnx", False) else devices.precision_name(amp)
    print(scoring.describe(args.split, len(dataset), args.crop) + (f", TTA {args.tta}" if tta.enabled else "")
          + f", {metrics['precision']}; {len(dataset) / metrics['seconds']:.1f} images/s")
    if args.split in trained.train_splits:
        print(f"{args.weights} was trained on {args.split} (--train-splits {','.join(trained.train_splits)}): "
              "these scores are not held out")
    print(report(metrics, table.names))
    if args.report:
        write_report(args.report, metrics, table.names)
        runner = inference.Runner(model, device, amp, args.channels_last, scoring.scale, tta)
        write_samples(*inference.sample_predictions(runner, dataset), table, args.report / "samples.png")
    if args.json:
        result = json_result(metrics, table.names, args, len(dataset), scoring, trained.train_splits)
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return metrics


if __name__ == "__main__":
    cfg.run_script(lambda: main(get_args_parser().parse_args()))
