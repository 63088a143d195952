"""Reading images and listing and pairing the files of a dataset folder in the CamVid layout."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
try:  # libjpeg-turbo/libpng through torchvision: ~1.4x faster than PIL here (deprecated in torchvision 0.29)
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # a torchvision without image decoding: PIL does it all
    decode_image = None

import cfg
from camvid.classes import ClassTable
from cfg import UserError


def read_image(path: str | Path) -> torch.Tensor:
    """Decode any image PIL or torchvision reads as a contiguous 3×H×W uint8 tensor (greyscale/RGBA converted)."""
    # Decoders write H×W×3; numpy's transposing copy is about twice as fast as the strided copy that
    # collating H×W×3-backed views would do, and crops of the contiguous result collate at memcpy speed.
    return torch.from_numpy(np.ascontiguousarray(read_rgb(path).transpose(2, 0, 1)))


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode any image PIL or torchvision reads as an H×W×3 uint8 array (greyscale/RGBA converted)."""
    if decode_image is not None:
        try:
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
        except RuntimeError:
            pass  # a format torchvision.io cannot decode (bmp, tiff, ...): PIL may
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from exc


def check_data_root(root: str | Path) -> None:
    """A missing CamVid folder is one clear line naming --data-root and how to get the data."""
    if not Path(root).is_dir():
        raise UserError(f"--data-root {root}: folder not found (set CAMVID_ROOT, or fetch it with "
                        "python dataset.py --download data/CamVid)")


def scan_images(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """stem -> path of every image file in folder, and a problem line for each stem used twice."""
    found: dict[str, Path] = {}
    problems = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in cfg.IMAGE_EXTENSIONS or not path.is_file():
            continue
        if path.stem in found:
            problems.append(f"{path}: stem '{path.stem}' also used by {found[path.stem].name}")
        else:
            found[path.stem] = path
    return found, problems


def list_images(folder: Path) -> dict[str, Path]:
    """stem -> path of every image file in folder; two files with one stem are an error."""
    found, problems = scan_images(folder)
    if problems:
        raise UserError(problems[0])
    return found


Pair = tuple[str, Path, Path]  # (stem, image, mask)


def pair_split(root: str | Path, split: str) -> tuple[list[Pair], list[str]]:
    """The pairs of a split (<stem>.<ext> in split/ with <stem>_L.<ext> in split_labels/) and a line for
    every pairing problem; the pairs list holds only complete pairs."""
    image_dir, mask_dir = Path(root) / split, Path(root) / f"{split}_labels"
    missing = [f"{folder}: folder not found (expected the CamVid layout, see docs/data.md)"
               for folder in (image_dir, mask_dir) if not folder.is_dir()]
    if missing:
        return [], missing
    images, problems = scan_images(image_dir)
    mask_files, mask_problems = scan_images(mask_dir)
    problems += mask_problems
    masks = {}
    for stem, path in mask_files.items():
        if stem.endswith(cfg.MASK_SUFFIX):
            masks[stem[: -len(cfg.MASK_SUFFIX)]] = path
        else:
            problems.append(f"{path}: mask name must end in '{cfg.MASK_SUFFIX}' before the extension")
    problems += [f"{images[stem]}: no mask {stem}{cfg.MASK_SUFFIX}.png in {mask_dir}"
                 for stem in sorted(images.keys() - masks.keys())]
    problems += [f"{masks[stem]}: no image {stem}.* in {image_dir}" for stem in sorted(masks.keys() - images.keys())]
    if not images:
        problems.append(f"{image_dir}: no images found")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images.keys() & masks.keys())], problems


def find_pairs(root: str | Path, split: str) -> list[Pair]:
    """(stem, image, mask) for a split, paired by stem; the first pairing problem is an error."""
    pairs, problems = pair_split(root, split)
    if problems:
        raise UserError(problems[0])
    return pairs


def parse_splits(text: str | Sequence[str]) -> tuple[str, ...]:
    """'train,val' (or a list of names) -> ('train', 'val'); a split named twice or none at all is an error."""
    splits = tuple(part.strip() for part in text.split(",")) if isinstance(text, str) else tuple(text)
    if not splits or "" in splits or len(set(splits)) != len(splits):
        raise UserError(f"splits '{text}': expected distinct names separated by commas, e.g. train,val")
    return splits


def find_split_pairs(root: str | Path, splits: Sequence[str], limit: int | None = None) -> list[Pair]:
    """The pairs of several splits, each paired by stem and cut to its first `limit` stems; one stem in two
    splits is an error (the same photo would be trained on twice)."""
    pairs, seen = [], {}
    for split in splits:
        for pair in find_pairs(root, split)[:limit]:
            if pair[0] in seen:
                raise UserError(f"{pair[1]}: stem '{pair[0]}' is also in split {seen[pair[0]]}")
            seen[pair[0]] = split
            pairs.append(pair)
    return pairs


def resolve_class_dict(root: str | Path, class_dict: str | Path | None = None) -> Path:
    """--class-dict, else the dataset's own class_dict.csv, else the copy in data/."""
    if class_dict:
        return Path(class_dict)
    own = Path(root) / "class_dict.csv"
    return own if own.is_file() else cfg.DEFAULT_CLASS_DICT


CAMVID_PAIRS = {"train": 367, "val": 101, "test": 233}  # image-mask pairs of each split of the 11-class release


def camvid_contents(root: str | Path) -> tuple[dict[str, int], list[str]]:
    """The pairs per split of a CamVid folder and why it is not a complete one (no problems: it is).

    Complete: class_dict.csv with the classes of data/class_dict.csv, train/ and val/ with all 367 and
    101 image-mask pairs, test/ with 1 to 233 (a sample is enough: tuning uses val). Files are listed and
    paired by stem, not decoded: `--check` decodes them."""
    root = Path(root)
    if not (root / "class_dict.csv").is_file():
        return {}, [f"{root}: no class_dict.csv"]
    try:
        names = ClassTable.from_csv(root / "class_dict.csv").names
    except UserError as exc:
        return {}, [str(exc)]
    problems = []
    if names != ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT).names:
        problems.append(f"{root / 'class_dict.csv'}: classes {', '.join(names)} are not CamVid's 11")
    counts = {}
    for split, expected in CAMVID_PAIRS.items():
        pairs, pairing = pair_split(root, split)
        counts[split] = len(pairs)
        problems += pairing[:1]
        complete = len(pairs) <= expected if split == "test" else len(pairs) == expected
        if not pairing and not complete:
            problems.append(f"{root / split}: {len(pairs)} image-mask pairs, CamVid has {expected}")
    return counts, problems
