"""Export a checkpoint to ONNX and check it against PyTorch with ONNX Runtime. `python export.py --help`."""
from __future__ import annotations

import argparse
import importlib
import json
import warnings
from pathlib import Path

import torch

import cfg
import inference
import onnx_backend
from cfg import UserError
from dataset import ClassTable, normalize_batch, read_image
from engine.checkpoints import atomic_write, load_checkpoint
from fcn import FCN

OPSET = 18  # the dynamo exporter's native and lowest opset (no version conversion); ORT >= 1.14 runs it
EXPORTERS = ("dynamo", "torchscript")
PARITY_SIZES = (cfg.EVAL_SIZE, (100, 150))  # CamVid's own size, and one that is not a multiple of 32
EXAMPLE_SHAPE = (2, 3, 72, 100)  # traced example: batch > 1 and H, W not multiples of 32, so nothing specialises
INPUT_DOC = ("images: float32 N x 3 x H x W, RGB, ImageNet-normalised ((pixel / 255 - mean) / std, pixel in "
             "0..255 as decoded from a uint8 image); any N, any H, W >= 32")
OUTPUT_DOC = "logits: float32 N x C x H x W (same H, W as the input); class = argmax over C"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export an FCN checkpoint to ONNX (dynamic batch, height and "
                                     "width) and check ONNX Runtime against PyTorch before keeping the file.",
                                     formatter_class=cfg.HelpFormatter)
    add = parser.add_argument
    add("--weights", required=True, type=Path, help="checkpoint written by train.py (best.pth)")
    add("--out", type=Path, help="ONNX file to write; without it: the checkpoint's path with .onnx")
    add("--class-dict", help="override the checkpoint's class colours stored in the metadata (same class names)")
    add("--exporter", default="dynamo", choices=EXPORTERS,
        help="dynamo: the torch.export-based exporter; torchscript: the legacy TorchScript tracer")
    add("--opset", type=int, default=OPSET, help="ONNX opset (below 18 only with --exporter torchscript)")
    add("--min-agreement", type=float, default=0.999,
        help="least fraction of pixels whose ONNX Runtime argmax must equal PyTorch's")
    add("--data-root", default=cfg.default_data_root(),
        help="also check parity on up to 2 real images of this CamVid folder when it has any "
             "($CAMVID_ROOT when set, else data/CamVid in the working folder)")
    return parser


def require_export_modules(exporter: str) -> None:
    """onnx (and onnxscript for the dynamo exporter) importable, else one UserError line."""
    for name in ("onnx", "onnxscript") if exporter == "dynamo" else ("onnx",):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"--exporter {exporter} needs {name}, which is not installed; "
                            f"{onnx_backend.INSTALL_HINT}") from exc
    onnx_backend.import_onnxruntime()


def checked_table(state: dict, class_dict: str | None, weights: Path) -> ClassTable:
    """The checkpoint's class table, or --class-dict with the same class names."""
    return inference.trained_table(inference.saved_table(state), class_dict, cfg.DEFAULT_CLASS_DICT, weights)


def metadata(model: FCN, table: ClassTable, weights: Path, exporter: str, downscale: float,
             test_scale: float = 1.0) -> dict[str, str]:
    """What a deployment needs besides the graph: classes, colours, normalisation, the scale to run at
    (resize inputs by test_scale / downscale, as predict.py does: train.py --downscale and --test-scale),
    provenance."""
    return {onnx_backend.METADATA_TAG: "1", "model": json.dumps(model.config.to_dict()), "downscale": str(downscale),
            "test_scale": str(test_scale),
            "class_names": json.dumps(list(table.names)), "class_colors": json.dumps(table.colors.tolist()),
            "void_colors": json.dumps(table.void_colors.tolist()), "ignore_index": str(cfg.IGNORE_INDEX),
            "mean": json.dumps(cfg.IMAGENET_MEAN), "std": json.dumps(cfg.IMAGENET_STD),
            "input": INPUT_DOC, "output": OUTPUT_DOC, "min_input_side": str(cfg.MIN_INPUT_SIDE),
            "source_checkpoint": weights.name, "exporter": f"torch {torch.__version__} {exporter}"}


def export_graph(model: FCN, path: Path, exporter: str, opset: int) -> None:
    """torch.onnx.export with dynamic N, H, W; input 'images', output 'logits'."""
    example = (torch.zeros(EXAMPLE_SHAPE),)
    names = {"input_names": [onnx_backend.INPUT], "output_names": [onnx_backend.OUTPUT], "opset_version": opset}
    axes = {0: "batch", 2: "height", 3: "width"}
    if exporter == "dynamo":
        # Axis names, which torch.onnx turns into Dim.DYNAMIC and names the graph's axes after: named
        # torch.export.Dims with bounds make torch 2.11's constraint solver fail ("Cannot create Dim with
        # inconsistent min=0, max=-oo"). The parity check proves the sizes stayed dynamic.
        program = torch.onnx.export(model, example, dynamo=True, verbose=False, **names,
                                    dynamic_shapes={"images": axes})
        program.save(str(path), external_data=False)
        return
    with warnings.catch_warnings():  # the tracer warns that it deprecated itself and about forward's size guard
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, dynamic_axes={"images": axes, "logits": axes},
                          **names)


def export_failure(error: Exception, exporter: str) -> str:
    """One line for an exporter's failure: its root cause's type and first line, and what to try."""
    cause = error.__cause__ or error  # torch.onnx wraps torch.export's error in a page of advice
    lines = str(cause).strip().splitlines() or [""]
    hint = "; try --exporter torchscript" if exporter == "dynamo" else ""
    return (f"--exporter {exporter}: torch {torch.__version__} cannot export this model "
            f"({type(cause).__name__}: {lines[0]}); nothing written{hint}")


def annotate(path: Path, model: FCN, table: ClassTable, weights: Path, exporter: str, downscale: float = 1.0,
             test_scale: float = 1.0) -> None:
    """Write the metadata, name the output's dynamic dims like the input's, and run onnx's checker."""
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in metadata(model, table, weights, exporter, downscale, test_scale).items():
        graph.metadata_props.add(key=key, value=value)
    graph.doc_string = f"FCN ({model.config.variant}, {model.config.backbone}) semantic segmentation; {INPUT_DOC}"
    # dynamo names the output dims by its symbolic expressions (e.g. Min(height, 32*...)); they equal the input's
    dims = graph.graph.output[0].type.tensor_type.shape.dim
    for index, name in ((0, "batch"), (2, "height"), (3, "width")):
        dims[index].dim_param = name
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def parity_inputs(data_root: str) -> list[tuple[str, torch.Tensor]]:
    """Seeded random uint8 batches at PARITY_SIZES (batch 2, then 1) and up to 2 real images of data_root."""
    generator = torch.Generator().manual_seed(0)
    batches = [(f"random {h}x{w} batch {n}", torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8,
                                                           generator=generator))
               for n, (h, w) in zip((2, 1), PARITY_SIZES)]
    for split in cfg.SPLITS:
        folder = Path(data_root) / split
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in cfg.IMAGE_EXTENSIONS)[:2]
            images = [(path.name, read_image(path)[None]) for path in files]
            return batches + [(name, image) for name, image in images if min(image.shape[-2:]) >= cfg.MIN_INPUT_SIDE]
    return batches


@torch.inference_mode()
def check_parity(model: FCN, onnx_model: onnx_backend.OnnxModel, inputs: list[tuple[str, torch.Tensor]],
                 min_agreement: float) -> float:
    """Print max |logit difference| and argmax agreement per input; UserError when any agreement is too low."""
    worst = 1.0
    for name, images in inputs:
        batch = normalize_batch(images)
        try:
            actual = onnx_model(batch)
        except onnx_backend.session_errors(onnx_backend.import_onnxruntime()) as exc:
            raise UserError(f"parity check failed: ONNX Runtime cannot run {name} ({str(exc).splitlines()[0]}); "
                            "nothing written") from exc
        expected = model(batch)
        labels = inference.predicted_classes(expected)
        agreement = (labels == inference.predicted_classes(actual)).double().mean().item()
        worst = min(worst, agreement)
        print(f"parity {name}: max |logit difference| {(expected - actual).abs().max().item():.3g}, "
              f"argmax agreement {100 * agreement:.3f} % ({labels.unique().numel()} classes predicted)")
    if worst < min_agreement:
        raise UserError(f"parity check failed: ONNX Runtime's argmax agrees with PyTorch's on {100 * worst:.3f} % "
                        f"of pixels, below --min-agreement {100 * min_agreement:.3f} %; nothing written")
    return worst


def write_checked(model: FCN, table: ClassTable, scales: tuple[float, float], path: Path,
                  args: argparse.Namespace) -> None:
    """Export into `path` (a temporary name), annotate it with the (downscale, test scale) to run at, and check
    parity there."""
    try:
        export_graph(model, path, args.exporter, args.opset)
    except Exception as error:  # torch.export and the tracer fail with many exception types, none of them ours
        raise UserError(export_failure(error, args.exporter)) from error
    annotate(path, model, table, args.weights, args.exporter, *scales)
    onnx_model = onnx_backend.load_onnx(path, table, torch.device("cpu"))
    check_parity(model, onnx_model, parity_inputs(args.data_root), args.min_agreement)


def main(args: argparse.Namespace) -> Path:
    """Returns the path written; the file appears only once parity has passed."""
    if not 0 < args.min_agreement <= 1:
        raise UserError(f"--min-agreement: expected a fraction in (0, 1], got {args.min_agreement}")
    if args.exporter == "dynamo" and args.opset < OPSET:  # it would quietly write opset 18 instead
        raise UserError(f"--opset {args.opset}: the dynamo exporter writes opset {OPSET} or newer; "
                        "use --exporter torchscript for an older one")
    out = args.out or args.weights.with_suffix(".onnx")
    if not out.parent.is_dir() or out.is_dir():
        raise UserError(f"--out {out}: expected a file name in an existing folder")
    require_export_modules(args.exporter)
    state = load_checkpoint(args.weights)
    table = checked_table(state, args.class_dict, args.weights)
    model = inference.model_from_checkpoint(state, table, args.weights).eval()  # fp32, CPU
    scales = inference.trained_downscale(state, args.weights), inference.trained_test_scale(state, args.weights)
    # Written under a temporary name and renamed into place only after the parity check passed: a failed
    # check leaves no file behind and an earlier file at --out untouched.
    atomic_write(out, lambda tmp: write_checked(model, table, scales, tmp, args))
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB, opset {args.opset}, {args.exporter} exporter)")
    return out


if __name__ == "__main__":
    cfg.run_script(lambda: main(get_args_parser().parse_args()))
