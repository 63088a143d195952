"""The label cache: encoded label maps stored as .npy files, keyed by mask file and class lookup."""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

import cfg

LABEL_CACHE_VERSION = 1  # part of every cache key: bump it when encoding changes so old files are never read


def default_label_cache() -> Path:
    """`$FCN_LABEL_CACHE` when set, else ~/.cache/fcn-camvid/labels."""
    return Path(os.environ.get(cfg.LABEL_CACHE_ENV) or Path.home() / ".cache" / "fcn-camvid" / "labels")


def add_label_cache_args(parser: argparse.ArgumentParser) -> None:
    """--label-cache DIR / --no-label-cache, shared by train.py, test.py and bench.py."""
    parser.add_argument("--label-cache", type=Path, default=None, metavar="DIR",
                        help=f"folder for encoded label maps (default ${cfg.LABEL_CACHE_ENV}, else ~/.cache/fcn-camvid/labels)")
    parser.add_argument("--no-label-cache", action="store_true", help="decode and encode every mask every time")


def label_cache_at(folder: str | Path | None, disabled: bool) -> "LabelCache | None":
    """The LabelCache that --label-cache DIR (folder; None: the default) and --no-label-cache (disabled) ask
    for; made in the main process so workers inherit its state."""
    return None if disabled else LabelCache(folder or default_label_cache())


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
