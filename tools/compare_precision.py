"""How far bf16 inference moves a checkpoint's predictions from fp32 on a split: pixel agreement and both MIoUs.

    python tools/compare_precision.py --weights weights/camvid-cpu/best.pth --data-root data/CamVid --downscale 4

Both passes run through the project's inference path (inference.Runner, as test.py and predict.py) on the
same batches; agreement counts every pixel and, separately, the labelled ones."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cfg  # noqa: E402
import devices  # noqa: E402
import inference  # noqa: E402
from cfg import UserError  # noqa: E402
from dataset import CamVidDataset, check_data_root, resolve_class_dict  # noqa: E402
from evalution_segmentaion import ConfusionMatrix  # noqa: E402
from transforms import eval_transform  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="bf16 vs fp32 inference of one checkpoint on a CamVid split.",
                                     formatter_class=cfg.HelpFormatter)
    add = parser.add_argument
    add("--weights", required=True, help="checkpoint written by train.py")
    add("--data-root", default=cfg.default_data_root(),
        help="CamVid folder: $CAMVID_ROOT when set, else data/CamVid in the working folder")
    add("--split", default="val", choices=("val", "test"), help="the split to compare on")
    add("--downscale", type=float, default=1.0,
        help="as test.py --downscale: score labels shrunk by this factor, the model at its own scale")
    add("--batch-size", type=int, default=4, help="images per forward pass")
    add("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def main(args: argparse.Namespace) -> dict:
    if not devices.cpu_native_bf16():
        raise UserError("this CPU computes no bf16 natively (AVX512-BF16 or AMX): nothing to compare")
    check_data_root(args.data_root)
    device = torch.device("cpu")
    trained = inference.load_model(args.weights, None, device, resolve_class_dict(args.data_root))
    model, table = trained.model, trained.table
    dataset = CamVidDataset(args.data_root, args.split, table, eval_transform(None, args.downscale))
    runners = {name: inference.Runner(model, device, amp, scale=trained.input_scale(args.downscale))
               for name, amp in (("fp32", None), ("bf16", torch.bfloat16))}
    confusions = {name: ConfusionMatrix(table.num_classes, device) for name in runners}
    same = total = same_labelled = labelled = 0
    for images, labels in DataLoader(dataset, args.batch_size):
        predictions = {name: runner.labels(images) for name, runner in runners.items()}
        for name, prediction in predictions.items():
            confusions[name].update(prediction.long(), labels.long())
        agree, known = predictions["fp32"] == predictions["bf16"], labels != cfg.IGNORE_INDEX
        same, total = same + int(agree.sum()), total + agree.numel()
        same_labelled, labelled = same_labelled + int((agree & known).sum()), labelled + int(known.sum())
    miou = {name: confusion.compute()["miou"] for name, confusion in confusions.items()}
    result = {"split": args.split, "images": len(dataset), "downscale": args.downscale,
              "agreement": same / total, "agreement_labelled": same_labelled / labelled,
              "miou_fp32": miou["fp32"], "miou_bf16": miou["bf16"], "weights": str(args.weights)}
    print(f"{args.split}: {len(dataset)} images; bf16 agrees with fp32 on {100 * result['agreement']:.3f} % of pixels "
          f"({100 * result['agreement_labelled']:.3f} % of labelled ones); MIoU fp32 {miou['fp32']:.4f}, "
          f"bf16 {miou['bf16']:.4f} ({miou['bf16'] - miou['fp32']:+.4f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    cfg.run_script(lambda: main(get_args_parser().parse_args()))
