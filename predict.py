"""Paint class masks for images with a trained FCN. `python predict.py --help`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cfg
from cfg import UserError
from dataset import ClassTable, colorize, normalize_batch, read_image
import utils


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write colourised FCN masks for images or folders of images.")
    add = parser.add_argument
    add("--weights", required=True, help="checkpoint written by train.py")
    add("--input", nargs="+", required=True, metavar="PATH", help="image files and/or folders")
    add("--out", required=True, type=Path, help="folder for <stem>.png masks")
    add("--overlay", action="store_true", help="also write <stem>_overlay.png: the mask blended on the photo")
    add("--alpha", type=float, default=0.5, help="mask opacity in the overlay")
    add("--class-dict", default=str(cfg.DEFAULT_CLASS_DICT), help="class colours")
    add("--device", default="auto", help="auto, cpu or cuda")
    return parser


def gather_inputs(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to their files (sorted); a missing path is an error."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"--input {name}: no such file or folder")
    return files


@torch.inference_mode()
def predict_labels(model: torch.nn.Module, image: torch.Tensor, device: torch.device) -> np.ndarray:
    """3×H×W uint8 image -> H×W uint8 class labels at the image's own size."""
    logits = model(normalize_batch(image[None].to(device), channels_last=True))
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def write_outputs(path: Path, image: torch.Tensor, labels: np.ndarray, table: ClassTable, args: argparse.Namespace) -> None:
    """<stem>.png (colour mask) and, with --overlay, <stem>_overlay.png."""
    mask = colorize(labels, table)
    Image.fromarray(mask).save(args.out / f"{path.stem}.png")
    if args.overlay:
        photo = image.permute(1, 2, 0).numpy().astype(np.float32)
        blend = (1 - args.alpha) * photo + args.alpha * mask.astype(np.float32)
        Image.fromarray(blend.round().astype(np.uint8)).save(args.out / f"{path.stem}_overlay.png")


def main(args: argparse.Namespace) -> int:
    """Returns how many images were predicted."""
    table = ClassTable.from_csv(args.class_dict)
    device = utils.resolve_device(args.device)
    model = utils.model_from_checkpoint(utils.load_checkpoint(args.weights), table, args.weights)
    model.to(device, memory_format=torch.channels_last).eval()  # NHWC: as test.py, and faster
    files = gather_inputs(args.input)
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in files:
        try:
            image = read_image(path)
        except UserError as error:
            print(f"skipped {error}", file=sys.stderr)
            continue
        if min(image.shape[1:]) < cfg.MIN_INPUT_SIDE:
            print(f"skipped {path}: {image.shape[2]}x{image.shape[1]} is smaller than "
                  f"{cfg.MIN_INPUT_SIDE}x{cfg.MIN_INPUT_SIDE}", file=sys.stderr)
            continue
        write_outputs(path, image, predict_labels(model, image, device), table, args)
        written += 1
    print(f"wrote {written} mask(s) to {args.out}")
    if written == 0:
        raise UserError(f"--input: none of the {len(files)} file(s) was a readable image")
    return written


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except UserError as error:
        utils.fail(str(error))
