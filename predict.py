"""Paint class masks for images, folders and videos with a trained FCN. `python predict.py --help`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import cfg
import devices
import inference
from cfg import UserError
from dataset import ClassTable, colorize, read_image
from engine.checkpoints import atomic_write

# Video containers predict.py streams with PyAV: extension -> muxer of the output.
VIDEO_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".avi": "avi", ".mkv": "matroska", ".webm": "webm"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write FCN masks for images, folders of images and videos.",
                                     formatter_class=cfg.HelpFormatter)
    add = parser.add_argument
    add("--weights", required=True, help="checkpoint written by train.py, or an exported .onnx")
    add("--input", nargs="+", required=True, metavar="PATH", help="image or video files and/or folders")
    add("--out", required=True, type=Path, help="output folder (names mirror the inputs: docs/inference.md)")
    add("--format", default="color", choices=("color", "index", "both"),
        help="color: <name>.png colour mask; index: <name>.png 8-bit class indices; both: colour + <name>_index.png")
    add("--overlay", action="store_true", help="also write <name>_overlay.png (video: the overlay, not the mask)")
    add("--alpha", type=float, default=0.5, help="mask opacity in the overlay")
    add("--tta", help="test-time augmentation: flip and/or scales, e.g. flip or flip,0.75,1,1.25")
    add("--scale", type=float,
        help="resize each image or frame by this factor before the model (relative to the input as it is), "
             "overriding the checkpoint's scale: e.g. 0.33 for 1080p frames and a full-resolution model; without "
             "it: the checkpoint's (its train.py --test-scale / --downscale, 1 for neither)")
    add("--class-dict", help="override the checkpoint's class colours with this class_dict.csv (same class names); "
        "without it: the checkpoint's own table")
    add("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu or cuda")
    add("--batch-size", type=int, default=8, help="images of one size per forward pass")
    add("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader processes decoding images")
    add("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="mixed precision: bf16/fp16 on CUDA, bf16 on CPUs with native bf16")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format")
    return parser


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_FORMATS


def gather_inputs(paths: list[str]) -> list[tuple[Path, Path]]:
    """(source, output path relative to OUT without suffix): files -> <stem>; the files of one folder ->
    <stem>; of several folders -> <folder name>/<stem>. Files in folders that are neither images nor videos
    are skipped (reported); a missing path is an error."""
    folders = [Path(name) for name in paths if Path(name).is_dir()]
    jobs = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            jobs.append((path, Path(path.stem)))
        elif path.is_dir():
            prefix = Path(path.resolve().name) if len(folders) > 1 else Path()
            for file in sorted(p for p in path.iterdir() if p.is_file()):
                if file.suffix.lower() in cfg.IMAGE_EXTENSIONS or is_video(file):
                    jobs.append((file, prefix / file.stem))
                else:
                    print(f"skipped {file}: not an image or video file name", file=sys.stderr)
        else:
            raise UserError(f"--input {name}: no such file or folder")
    return jobs


def output_files(source: Path, relative: Path, args: argparse.Namespace) -> list[Path]:
    """Every file predict.py writes for one input: video -> OUT/<name><ext>; image -> <name>.png (colour or
    index), <name>_index.png (--format both), <name>_overlay.png (--overlay)."""
    base = args.out / relative
    if is_video(source):
        return [base.with_name(base.name + source.suffix.lower())]
    files = [base.with_name(base.name + ".png")]
    if args.format == "both":
        files.append(base.with_name(base.name + "_index.png"))
    if args.overlay:
        files.append(base.with_name(base.name + "_overlay.png"))
    return files


def check_outputs(jobs: list[tuple[Path, Path]], args: argparse.Namespace) -> None:
    """Before anything runs: no two inputs write the same file, and no output replaces an input."""
    inputs = {source.resolve(): source for source, _ in jobs}
    writer_of: dict[Path, Path] = {}
    for source, relative in jobs:
        for target in output_files(source, relative, args):
            key = target.resolve()
            if key in inputs:
                raise UserError(f"--out {args.out}: {target} would overwrite the input {inputs[key]}")
            if key in writer_of:
                raise UserError(f"--out {args.out}: {writer_of[key]} and {source} would both write {target}; "
                                "rename one or predict them separately")
            writer_of[key] = source


class ImageFiles(Dataset):
    """Decodes images in DataLoader workers; an unreadable file becomes a message, not an exception."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, read_image(self.files[index]), ""
        except UserError as error:
            return index, None, str(error)


class Writer:
    """Runs file writes on a few threads while the model works on the next batch; at most `depth` writes
    wait at once, so memory stays flat however many images there are."""

    def __init__(self, threads: int = min(4, os.cpu_count() or 1), depth: int = 16):
        self.pool = ThreadPoolExecutor(threads)
        self.pending: deque[Future] = deque()
        self.depth = depth

    def submit(self, task: Callable, *args) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(task, *args))

    def close(self) -> None:
        """Wait for every write; the first failure is raised here."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(cancel_futures=True)


def paint(image: np.ndarray, labels: np.ndarray, table: ClassTable, overlay: bool, alpha: float) -> np.ndarray:
    """H×W×3 colour mask, or the mask blended on the H×W×3 photo."""
    mask = colorize(labels, table)
    if not overlay:
        return mask
    blend = (1 - alpha) * image.astype(np.float32) + alpha * mask.astype(np.float32)
    return blend.round().astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    """One PNG, written atomically (a stopped run never leaves a truncated mask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def write_image_outputs(image: torch.Tensor, labels: np.ndarray, files: list[Path], table: ClassTable,
                        args: argparse.Namespace) -> None:
    """The files of output_files(): colour or index mask, then index (--format both), then overlay."""
    save_png(labels if args.format == "index" else colorize(labels, table), files[0])
    if args.format == "both":
        save_png(labels, files[1])
    if args.overlay:
        save_png(paint(image.permute(1, 2, 0).numpy(), labels, table, True, args.alpha), files[-1])


def same_size_batches(loader: DataLoader, size: int, runner: inference.Runner,
                      bar: tqdm) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Consecutive images of one size, up to `size` at a time; unreadable or too small ones are reported."""
    batch: list[tuple[int, torch.Tensor]] = []
    for index, image, problem in loader:
        if image is None or not runner.fits(*image.shape[1:]):
            bar.update()
            path = loader.dataset.files[index]
            reason = problem or f"{path}: {image.shape[2]}x{image.shape[1]} is too small for the model"
            tqdm.write(f"skipped {reason}", file=sys.stderr)
            continue
        if batch and (len(batch) == size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((index, image))
    if batch:
        yield batch


def predict_images(jobs: list[tuple[Path, Path]], runner: inference.Runner, table: ClassTable,
                   args: argparse.Namespace) -> int:
    """Masks for every image job; returns how many were written."""
    files = [source for source, _ in jobs]
    loader = DataLoader(ImageFiles(files), batch_size=None, num_workers=args.workers,
                        pin_memory=runner.device.type == "cuda")
    writer, written = Writer(), 0
    with tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True) as bar:
        try:
            for batch in same_size_batches(loader, args.batch_size, runner, bar):
                labels = runner.labels(torch.stack([image for _, image in batch])).cpu().numpy()
                for (index, image), label in zip(batch, labels):
                    writer.submit(write_image_outputs, image, label, output_files(*jobs[index], args), table, args)
                written += len(batch)
                bar.update(len(batch))
        finally:
            writer.close()
    return written


def import_av():
    """PyAV, imported only when a video is handled (minimal installs may not have it)."""
    try:
        import av
    except ImportError:
        raise UserError("video input needs PyAV: pip install av") from None
    return av


def predict_video(source: Path, target: Path, runner: inference.Runner, table: ClassTable,
                  args: argparse.Namespace) -> int:
    """Stream a video frame by frame into a same-size, same-rate video of masks (or overlays); returns
    the frame count."""
    av = import_av()
    try:
        with av.open(str(source)) as container:
            stream = container.streams.video[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            counted: list[int] = []
            atomic_write(target, lambda tmp: counted.append(
                encode_video(av, container, stream, tmp, target, runner, table, args)))
            return counted[0]
    except (av.error.FFmpegError, IndexError) as exc:  # IndexError: a file without a video stream
        raise UserError(f"--input {source}: cannot read or write this video ({exc})") from exc


def frame_batches(container, stream, size: int) -> Iterator[list[np.ndarray]]:
    """Decoded H×W×3 uint8 frames, `size` at a time (the last batch may be shorter)."""
    frames: list[np.ndarray] = []
    for frame in container.decode(stream):
        frames.append(frame.to_ndarray(format="rgb24"))
        if len(frames) == size:
            yield frames
            frames = []
    if frames:
        yield frames


def encode_video(av, container, stream, path: Path, target: Path, runner: inference.Runner, table: ClassTable,
                 args: argparse.Namespace) -> int:
    """Decode, predict in batches of --batch-size frames, encode on a writer thread (frames stay in order);
    returns the frame count. `path` is the temporary file that becomes `target`."""
    width, height = stream.codec_context.width, stream.codec_context.height
    if width % 2 or height % 2:
        raise UserError(f"--input: {width}x{height} video; predict.py writes yuv420p video, which needs even sizes")
    if not runner.fits(height, width):
        raise UserError(f"--input: {width}x{height} video frames are too small for the model")
    suffix = target.suffix.lower()
    codec = "libvpx-vp9" if suffix == ".webm" else "libx264" if "libx264" in av.codecs_available else "mpeg4"
    count = 0
    with av.open(str(path), "w", format=VIDEO_FORMATS[suffix]) as output:
        out = output.add_stream(codec, rate=stream.average_rate or stream.guessed_rate or 25)
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"

        def write(frames: list[np.ndarray], labels: np.ndarray) -> None:
            for frame, label in zip(frames, labels):
                picture = paint(frame, label, table, args.overlay, args.alpha)
                output.mux(out.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))

        writer = Writer(threads=1, depth=4)  # one thread: the encoder takes frames in order
        with tqdm(total=stream.frames or None, desc=target.name, unit="frame", dynamic_ncols=True) as bar:
            try:
                for frames in frame_batches(container, stream, args.batch_size):
                    writer.submit(write, frames, predict_frames(frames, runner))
                    count += len(frames)
                    bar.update(len(frames))
            finally:
                writer.close()
        output.mux(out.encode())  # flush the encoder
    return count


def predict_frames(frames: list[np.ndarray], runner: inference.Runner) -> np.ndarray:
    """H×W×3 uint8 frames -> N×H×W uint8 labels."""
    batch = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    return runner.labels(batch).cpu().numpy()


def main(args: argparse.Namespace) -> int:
    """Returns how many images and video frames were predicted."""
    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be positive and --workers not negative")
    jobs = gather_inputs(args.input)
    check_outputs(jobs, args)
    if any(is_video(source) for source, _ in jobs):
        import_av()  # fail before the model loads
    device = devices.resolve_device(args.device)
    trained = inference.load_model(args.weights, args.class_dict, device)
    model, table = trained.model, trained.table
    if args.format != "color" and table.num_classes > 256:
        raise UserError(f"--format {args.format}: 8-bit index PNGs hold at most 256 classes, the table has "
                        f"{table.num_classes}")
    runner = inference.Runner(model, device, devices.amp_dtype(device, args.amp), args.channels_last,
                              trained.input_scale(scale=args.scale), inference.parse_tta(args.tta))
    print(f"model input: {runner.scale:g}x each image's size ("
          + ("--scale)" if args.scale is not None else "the checkpoint's scale)"))
    start = time.perf_counter()
    images = [job for job in jobs if not is_video(job[0])]
    done = predict_images(images, runner, table, args) if images else 0
    for source, relative in jobs:
        if is_video(source):
            done += predict_video(source, output_files(source, relative, args)[0], runner, table, args)
    seconds = time.perf_counter() - start
    print(f"predicted {done} image(s)/frame(s) in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} images/s); "
          f"outputs in {args.out}")
    if done == 0:
        raise UserError(f"--input: none of the {len(jobs)} file(s) was a readable image or video")
    return done


if __name__ == "__main__":
    cfg.run_script(lambda: main(get_args_parser().parse_args()))
