"""The class table of class_dict.csv and the hash label encoding of colour masks."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import cfg
from cfg import UserError

VOID_NAMES = {"unlabelled", "unlabeled", "void", "background_void"}


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
