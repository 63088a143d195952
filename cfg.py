"""Project-wide constants and defaults shared by every script."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent
IGNORE_INDEX = 255  # label value for void/unlabelled pixels: excluded from loss and metrics
CROP_SIZE = (352, 480)  # (H, W) train crop; divisible by 32 so every pooling stage is exact
EVAL_SIZE = (360, 480)  # CamVid's native resolution, the benchmark protocol
MIN_INPUT_SIDE = 32  # five 2x poolings need at least this much
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIX = "_L"  # CamVid masks are <stem>_L.png
SPLITS = ("train", "val", "test")
DEFAULT_CLASS_DICT = REPO_ROOT / "data" / "class_dict.csv"
LABEL_CACHE_ENV = "FCN_LABEL_CACHE"  # folder of cached encoded label maps (default ~/.cache/fcn-camvid/labels)


def default_data_root() -> str:
    """`$CAMVID_ROOT` when set, else `data/CamVid` (relative to the working folder)."""
    return os.environ.get("CAMVID_ROOT") or "data/CamVid"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every script's --help: each option's default once, at the end of its help; none for a None default
    (the help text says what happens then) or where the help already quotes `%(default)s`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or not action.option_strings:
            return action.help or ""
        return super()._get_help_string(action)


# How torch.utils.data re-raises a worker's exception in the main process: the same type built from
# "Caught UserError in DataLoader worker process 0.\nOriginal Traceback ...\ncfg.UserError: <message>".
WORKER_WRAPPER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\n"
                            r"Original Traceback.*\n(?:[\w.]+\.)?\1: (.*)", re.DOTALL)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""

    def __init__(self, message: str = ""):
        # Recover the worker's own message so `--workers N` prints the line `--workers 0` prints.
        match = WORKER_WRAPPER.fullmatch(message)
        super().__init__(match.group(2).strip() if match else message)


def fail(message: str, code: int = 2) -> None:
    """Print one clear line and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_script(main: Callable[[], object]) -> None:
    """A script's entry point: a UserError (bad flag, file or data) becomes one `error: ...` line and exit 2."""
    try:
        main()
    except UserError as error:
        fail(str(error))
