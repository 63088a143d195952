"""Evaluate a checkpoint on CamVid: PA, MPA, MIoU, FWIoU and per-class IoU. `python test.py --help`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

import cfg
from cfg import UserError
from dataset import CamVidDataset, ClassTable, add_label_cache_args, check_data_root, label_cache_from_args
from train import Loop, evaluate, resolve_class_dict
from transforms import eval_transform
import utils


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate an FCN checkpoint on a CamVid split.")
    add = parser.add_argument
    add("--data-root", default=cfg.default_data_root(), help="CamVid folder ($CAMVID_ROOT, else data/CamVid)")
    add("--class-dict", default=None, help="class_dict.csv (default: DATA_ROOT/class_dict.csv, else data/class_dict.csv)")
    add("--split", default="test", choices=("test", "val"))
    add("--weights", required=True, help="checkpoint written by train.py (best.pth or last.pth)")
    add("--limit", type=int, help="only the first K images (by stem)")
    add("--crop", action="store_true", help="evaluate on the 352x480 centre crop instead of full 360x480")
    add("--json", type=Path, help="also write the metrics to this JSON file")
    add("--batch-size", type=int, default=4)
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--workers", type=int, default=utils.default_workers(), help="data loader processes (see train.py --help)")
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
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


def main(args: argparse.Namespace) -> dict:
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size and --limit must be positive integers")
    check_data_root(args.data_root)
    table = ClassTable.from_csv(resolve_class_dict(args.data_root, args.class_dict))
    device = utils.resolve_device(args.device)
    model = utils.model_from_checkpoint(utils.load_checkpoint(args.weights), table, args.weights).to(device)
    dataset = CamVidDataset(args.data_root, args.split, table, eval_transform(cfg.CROP_SIZE if args.crop else None),
                            args.limit, label_cache=label_cache_from_args(args))
    loader = DataLoader(dataset, args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    loop = Loop(device, utils.amp_dtype(device, args.amp), channels_last=args.channels_last)
    if loop.channels_last:
        model.to(memory_format=torch.channels_last)
    metrics = evaluate(model, loader, table.num_classes, loop)
    print(f"{args.split}: {len(dataset)} images, {'352x480 centre crop' if args.crop else 'full resolution'}")
    print(report(metrics, table.names))
    if args.json:
        result = {"pixel_accuracy": metrics["pixel_accuracy"], "mean_pixel_accuracy": metrics["mean_pixel_accuracy"],
                  "miou": metrics["miou"], "fwiou": metrics["fwiou"], "iou": dict(zip(table.names, metrics["iou"])),
                  "class_accuracy": dict(zip(table.names, metrics["class_accuracy"])), "split": args.split,
                  "images": len(dataset), "weights": str(args.weights)}
        utils.atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return metrics


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except UserError as error:
        utils.fail(str(error))
