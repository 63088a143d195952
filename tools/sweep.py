"""Train several variants under one time budget each and score each as the benchmark scores (test.py, 360x480
labels): one table of flags, epochs, minutes and val MIoU, for choosing a recipe.

    python tools/sweep.py --budget 8m --out weights/sweep \\
        "base=--recipe camvid" "ema=--recipe camvid --ema 0.999" "aux=--recipe camvid --aux-weight 0.4"
    python tools/sweep.py --budget 20m --device cuda --workers 12 --out weights/sweep-gpu NAME=FLAGS ...

Each NAME=FLAGS runs `train.py FLAGS --time-budget BUDGET --out OUT/NAME` and then `test.py --weights
OUT/NAME/best.pth --split SPLIT --json OUT/NAME/SPLIT.json`; a run that fails is reported and the sweep goes on.
OUT/sweep.md and OUT/sweep.json hold the table (re-written after every run, so an interrupted sweep keeps what
it measured). A folder that already holds a run is scored again, not retrained.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_run(text: str) -> tuple[str, list[str]]:
    """'NAME=FLAGS' -> (NAME, [flags])."""
    name, separator, flags = text.partition("=")
    if not separator or not name.strip() or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS (e.g. ema=--recipe camvid --ema 0.999), got {text!r}")
    return name.strip(), shlex.split(flags)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train variants under one time budget each; score each with test.py.")
    parser.add_argument("runs", nargs="+", type=parse_run, metavar="NAME=FLAGS", help="one variant: its train.py flags")
    parser.add_argument("--budget", required=True, help="train.py --time-budget of every run, e.g. 8m")
    parser.add_argument("--out", type=Path, default=Path("weights/sweep"), help="folder of the runs (default: %(default)s)")
    parser.add_argument("--common", default="", help="flags added to every train.py command (default: none)")
    parser.add_argument("--data-root", help="--data-root of train.py and test.py (default: theirs)")
    parser.add_argument("--device", default="auto", help="--device of train.py and test.py (default: %(default)s)")
    parser.add_argument("--workers", type=int, help="--workers of train.py and test.py (default: theirs)")
    parser.add_argument("--split", default="val", choices=("val", "test"), help="the split to score (default: %(default)s)")
    return parser


def run_command(command: list[str], log: Path) -> tuple[int, float]:
    """Run a command in the repository, its output appended to `log`; (exit code, seconds)."""
    started = time.monotonic()
    with open(log, "a") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        code = subprocess.call(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    return code, time.monotonic() - started


def one_run(name: str, flags: list[str], args: argparse.Namespace) -> dict:
    """Train (unless the folder already holds a finished run) and score one variant."""
    folder = args.out / name
    both = ["--device", args.device] + (["--workers", str(args.workers)] if args.workers is not None else [])
    both += ["--data-root", args.data_root] if args.data_root else []
    folder.mkdir(parents=True, exist_ok=True)
    log, row = folder / "sweep.log", {"name": name, "flags": shlex.join(flags)}
    if not (folder / "results.json").is_file():
        code, seconds = run_command([sys.executable, "train.py", *flags, *shlex.split(args.common), *both,
                                     "--time-budget", args.budget, "--out", str(folder)], log)
        row.update(train_exit=code, train_minutes=round(seconds / 60, 2))
    if (folder / "results.json").is_file():
        results = json.loads((folder / "results.json").read_text())
        row.update(epochs=results["epochs"], completed=results["completed"], train_val_miou=results["miou"],
                   peak_memory_mb=results.get("peak_memory_mb"))
    if (folder / "best.pth").is_file():
        score = folder / f"{args.split}.json"
        code, _ = run_command([sys.executable, "test.py", "--weights", str(folder / "best.pth"), "--split", args.split,
                               *both, "--json", str(score)], log)
        if code == 0:
            scored = json.loads(score.read_text())
            row.update({f"{args.split}_miou": scored["miou"], "label_size": scored["label_size"],
                        **{f"iou_{k}": v for k, v in scored["iou"].items()}})
    return row


def table(rows: list[dict], split: str) -> str:
    """The sweep as a markdown table."""
    lines = [f"| run | flags | epochs | train minutes | {split} MIoU | completed |", "|---|---|---|---|---|---|"]
    for row in rows:
        miou = row.get(f"{split}_miou")
        lines.append(f"| {row['name']} | `{row['flags']}` | {row.get('epochs', '')} | {row.get('train_minutes', '')} | "
                     f"{'' if miou is None else f'{miou:.4f}'} | {row.get('completed', 'failed')} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, flags in args.runs:
        rows.append(one_run(name, flags, args))
        (args.out / "sweep.json").write_text(json.dumps(rows, indent=2))
        (args.out / "sweep.md").write_text(table(rows, args.split))
        print(table(rows[-1:], args.split).splitlines()[-1], flush=True)
    print(table(rows, args.split))
    return 0 if all(f"{args.split}_miou" in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
