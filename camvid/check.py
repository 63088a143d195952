"""The dataset doctor behind `dataset.py --check`: every pair decoded, every problem listed, class shares."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import cfg
from camvid.classes import ClassTable, MaskEncoder, packed_color_hash
from camvid.layout import pair_split, read_rgb
from cfg import UserError


@dataclass
class FileCheck:
    """What checking one image/mask pair found."""

    split: str
    size: tuple[int, int] | None  # the image's (W, H); None when unreadable
    counts: np.ndarray | None  # pixels per label value (256), None when the mask is unreadable
    problems: list[str]


def check_pair(split: str, image_path: Path, mask_path: Path, encoder: MaskEncoder, table_name: str) -> FileCheck:
    """Decode one pair and list every problem: unreadable files, size mismatch, each unknown colour."""
    problems, decoded = [], []
    for path in (image_path, mask_path):
        try:
            decoded.append(read_rgb(path))
        except UserError as exc:
            problems.append(str(exc))
            decoded.append(None)
    image, colors = decoded
    size = None if image is None else (image.shape[1], image.shape[0])
    if size is not None and min(size) < cfg.MIN_INPUT_SIDE:
        problems.append(f"{image_path}: {size[0]}x{size[1]} is smaller than the smallest FCN input "
                        f"({cfg.MIN_INPUT_SIDE}x{cfg.MIN_INPUT_SIDE})")
    if colors is None:
        return FileCheck(split, size, None, problems)
    if size is not None and colors.shape[:2] != image.shape[:2]:
        problems.append(f"{mask_path}: size {colors.shape[1]}x{colors.shape[0]} differs from its image "
                        f"{image_path.name} ({size[0]}x{size[1]})")
    hashes = packed_color_hash(colors)
    labels = np.take(encoder.table, hashes)
    unknown, pixels = np.unique(hashes[labels == MaskEncoder.UNKNOWN], return_counts=True)
    for value, count in sorted(zip(unknown.tolist(), pixels.tolist()), key=lambda item: -item[1]):
        problems.append(f"{mask_path}: colour ({value >> 16}, {(value >> 8) & 255}, {value & 255}) "
                        f"on {count} pixels not in {table_name}")
    return FileCheck(split, size, np.bincount(labels, minlength=256), problems)


def class_shares(checks: list[FileCheck], table: ClassTable, splits: list[str]) -> pd.DataFrame:
    """Per-class share (%) of each split's mask pixels; void (the ignore index) is a row of its own."""
    rows = [*table.names, "void"]
    columns = {}
    for split in splits:
        counts = sum((c.counts for c in checks if c.split == split and c.counts is not None), np.zeros(256, np.int64))
        known = np.append(counts[: table.num_classes], counts[cfg.IGNORE_INDEX])
        columns[split] = 100 * known / max(1, counts.sum())
    return pd.DataFrame(columns, index=rows)


def split_summary(split: str, checks: list[FileCheck]) -> str:
    """'train: 367 pairs, sizes 480x360 (367)'."""
    sizes = pd.Series([f"{c.size[0]}x{c.size[1]}" for c in checks if c.size is not None]).value_counts()
    listed = ", ".join(f"{size} ({count})" for size, count in sizes.items()) or "none readable"
    return f"{split}: {len(checks)} pairs, image sizes {listed}"


def check_dataset(root: str | Path, class_dict: str | Path, workers: int) -> list[str]:
    """Check every split present in one threaded pass; print the summary and class shares, return the problems."""
    root, class_dict = Path(root), Path(class_dict)
    if not root.is_dir():
        raise UserError(f"--check {root}: folder not found")
    table = ClassTable.from_csv(class_dict)
    encoder = MaskEncoder(table)
    problems, jobs, splits = [], [], []
    for split in cfg.SPLITS:
        required = split in ("train", "val")  # what train.py reads; test.py also needs test/
        if not required and not (root / split).exists() and not (root / f"{split}_labels").exists():
            continue
        pairs, pairing = pair_split(root, split)
        problems += pairing
        splits.append(split)
        jobs += [(split, image, mask, encoder, class_dict.name) for _, image, mask in pairs]
    with ThreadPoolExecutor(workers) as pool:
        checks = list(tqdm(pool.map(lambda job: check_pair(*job), jobs), total=len(jobs), desc="checking",
                           unit="pair", file=sys.stderr))
    print(f"{root} with {class_dict} ({table.num_classes} classes, "
          f"{len(table.colors) + len(table.extra_colors)} class colours, {len(table.void_colors)} void)")
    for split in splits:
        print(split_summary(split, [c for c in checks if c.split == split]))
    print("pixel share per class (%):")
    print(class_shares(checks, table, splits).to_string(float_format=lambda v: f"{v:.2f}"))
    return problems + [line for c in checks for line in c.problems]
