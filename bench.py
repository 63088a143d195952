"""Throughput benchmark: data pipeline, FCN-8s train step and inference, eager fp32 vs the fast path.

`python bench.py --help`. Prints a table, then one JSON object as the last line (also written to --json).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, NoReturn

import torch

import cfg
import devices
from benchmarks.data import measure_data
from benchmarks.models import (
    measure_backbones,
    measure_infer,
    measure_models,
    model_config,
    prepare,
    workers_needed,
)
from benchmarks.plan import DATA_BATCH, MATMUL_SIDE, PLANS, Mode, Plan
from benchmarks.profile import profile_rows, profile_train_step
from benchmarks.report import print_report, size
from benchmarks.timing import process_peak_mb
from cfg import UserError
from dataset import (
    ClassTable,
    add_label_cache_args,
    check_data_root,
    label_cache_at,
    resolve_class_dict,
)
from fcn import BACKBONES, FCN


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like every other error of the project."""

    def error(self, message: str) -> NoReturn:
        """Print 'error: bench.py: MESSAGE' and exit 2 (no usage block)."""
        cfg.fail(f"{self.prog}: {message}")


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of bench.py."""
    parser = OneLineParser(prog="bench.py", description="Benchmark the data pipeline, FCN-8s training and "
                           "inference (eager fp32 vs the fast path).",
                           formatter_class=cfg.HelpFormatter)
    add = parser.add_argument
    add("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu or cuda")
    add("--data-root", default=cfg.default_data_root(),
        help="CamVid folder: $CAMVID_ROOT when set, else data/CamVid in the working folder")
    add("--json", type=Path, metavar="F", help="also write the JSON object to this file")
    add("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run of seconds")
    add("--compile", action="store_true", help="torch.compile the fast-path model")
    add_label_cache_args(parser)
    add("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="fast path: mixed precision (bf16/fp16 on CUDA, bf16 on CPUs with native bf16)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="fast path: channels-last (NHWC) memory format, as train.py")
    add("--train-size", type=int, nargs=2, metavar=("H", "W"),
        help="train step size (without it: 352 480 on CUDA, 176 240 on CPU, 32 64 with --quick)")
    add("--train-batch", type=int, help="train step batch (without it: 8 on CUDA, 2 on CPU, 1 with --quick)")
    add("--infer-batch", type=int,
        help="inference throughput batch (without it: 8 on CUDA, 2 on CPU, 1 with --quick)")
    add("--fc-width", type=int, help="fc6/fc7 channels (without it: 4096 on CUDA, 1024 on CPU, 32 with --quick)")
    add("--steps", type=int, help="timed calls per block (without it: 20 on CUDA, 1 on CPU and with --quick)")
    add("--repeats", type=int, help="timed blocks per mode, medians reported (without it: 5, 1 with --quick)")
    add("--backbones", default="all", metavar="NAMES",
        help="also time the fast path's train step and inference of FCN-8s on these backbones (comma-separated, "
             f"'all': {', '.join(BACKBONES)}; 'none': skip)")
    add("--profile", type=int, default=0, metavar="STEPS",
        help="also profile this many fast-path train steps with torch.profiler and list the operators (CUDA kernels "
             "on a GPU) that take the most time (0: off)")
    add("--onnx", action=argparse.BooleanOptionalAction, default=True,
        help="also ONNX Runtime CPU inference beside eager and fast (needs requirements-export.txt)")
    return parser


def make_plan(args: argparse.Namespace, device: torch.device) -> Plan:
    """The device's (or --quick) plan with the explicit flags applied, checked."""
    plan = PLANS["quick" if args.quick else device.type]
    overrides = {"train_size": tuple(args.train_size) if args.train_size else None, "train_batch": args.train_batch,
                 "infer_batch": args.infer_batch, "fc_width": args.fc_width, "steps": args.steps,
                 "repeats": args.repeats}
    plan = replace(plan, **{key: value for key, value in overrides.items() if value is not None})
    for key in ("train_batch", "infer_batch", "fc_width", "steps", "repeats"):
        if getattr(plan, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}: expected a positive integer, got {getattr(plan, key)}")
    if min(plan.train_size) < cfg.MIN_INPUT_SIDE:
        raise UserError(f"--train-size: expected at least {cfg.MIN_INPUT_SIDE} each side, got {list(plan.train_size)}")
    return plan


def fast_mode(args: argparse.Namespace, device: torch.device) -> Mode:
    """The project's fast path as train.py sets it up on this device."""
    cuda = device.type == "cuda"
    return Mode("fast", devices.amp_dtype(device, args.amp), args.channels_last, fused=True, cudnn_benchmark=cuda,
                compile=args.compile)


# ---------------------------------------------------------------- timing helpers


# ---------------------------------------------------------------- data pipeline


# ---------------------------------------------------------------- model, FLOPs, steps


# ---------------------------------------------------------------- the measurements


def device_name(device: torch.device) -> str:
    """devices.device_name, plus on CPU the threads torch uses."""
    name = devices.device_name(device)
    return name if device.type == "cuda" else f"{name}, torch uses {torch.get_num_threads()} threads"


def run_info(args: argparse.Namespace, plan: Plan, device: torch.device, modes: dict[str, Mode]) -> dict:
    """The settings part of the JSON object."""
    return {"device": device.type, "device_name": device_name(device),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "quick": args.quick, "label_cache": not args.no_label_cache,
            "model": "fcn8s", "backbone": "vgg16_bn",
            "fc_width": plan.fc_width, "data_batch": DATA_BATCH, "data_workers": 1,
            "train_size": list(plan.train_size), "train_batch": plan.train_batch,
            "infer_size": list(plan.infer_size), "infer_batch": plan.infer_batch,
            "steps": plan.steps, "repeats": plan.repeats,
            "eager_path": modes["eager"].describe(), "fast_path": modes["fast"].describe(),
            # PyTorch's defaults, which "eager fp32" keeps: on Ampere+ cuDNN convolutions run in TF32
            "tf32_conv": tf32_flag(lambda: torch.backends.cudnn.allow_tf32) if device.type == "cuda" else None,
            "tf32_matmul": tf32_flag(lambda: torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None,
            "precision": devices.precision_name(modes["fast"].amp)}


def tf32_flag(read: Callable[[], bool]) -> bool | None:
    """One of the old TF32 switches, or None: since torch 2.9 reading them warns, and it raises where the new
    fp32_precision settings were used."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(read())
        except RuntimeError:
            return None


def backbone_list(text: str) -> list[str]:
    """--backbones: 'all', 'none' or comma-separated names, each checked."""
    if text == "none":
        return []
    names = list(BACKBONES) if text == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKBONES]
    if unknown:
        raise UserError(f"--backbones: unknown {', '.join(unknown)}; expected all, none or some of {', '.join(BACKBONES)}")
    return names


# ---------------------------------------------------------------- report


def main(args: argparse.Namespace) -> dict:
    """Run every measurement, print the table and the JSON line; returns the JSON object."""
    device = devices.resolve_device(args.device)
    plan = make_plan(args, device)
    backbones = backbone_list(args.backbones)
    check_data_root(args.data_root)
    if args.json and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: folder {args.json.parent} not found")
    table = ClassTable.from_csv(resolve_class_dict(args.data_root))
    modes = {"eager": Mode("eager"), "fast": fast_mode(args, device)}
    result = run_info(args, plan, device, modes)
    label_cache = label_cache_at(args.label_cache, args.no_label_cache)
    result.update(measure_data(args.data_root, table, plan, device, label_cache))
    result["matmul_side"] = 1024 if args.quick else MATMUL_SIDE
    result.update(measure_models(plan, modes, device, table.num_classes, result["matmul_side"]))
    # Only a GPU's train rate says how many workers a real run needs; the CPU plan is a smaller model.
    cuda = device.type == "cuda"
    result["workers_needed"] = workers_needed(result["train_fast_img_s"], result["data_recipe_img_s"]) if cuda else None
    peaks = [result["train_eager_peak_mem_mb"], result["train_fast_peak_mem_mb"], result["infer_peak_mem_mb"]]
    result["peak_mem_mb"] = process_peak_mb(device, max((p for p in peaks if p is not None), default=0.0))
    result["backbones"] = measure_backbones(backbones, plan, modes["fast"], device, table.num_classes)
    if args.profile > 0:
        result["profile"] = profile_train_step(plan, modes["fast"], device, table.num_classes, args.profile)
    if args.onnx:
        result.update(bench_onnx(plan, modes, device, table, "torchscript" if args.quick else "dynamo"))
    print_report(result)
    if "profile" in result:
        print(f"profile: {args.profile} fast-path train steps, the operators with the most "
              + ("CUDA kernel time" if device.type == "cuda" else "CPU time"))
        print("\n".join(profile_rows(result["profile"])))
    line = json.dumps(result)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    return result


# ---------------------------------------------------------------- ONNX Runtime (export.py's graph)

def bench_onnx(plan: Plan, modes: dict[str, Mode], device: torch.device, table: ClassTable,
               exporter: str = "dynamo") -> dict:
    """ONNX Runtime CPU inference of the bench's FCN-8s, exported as export.py does, timed in alternating
    blocks with eager fp32 and the fast path (measure_infer): throughput and batch-1 latency. (--quick
    exports with the legacy tracer: about 1 s instead of about 10.)"""
    import tempfile  # here, with export/onnx_backend: the rest of bench.py runs without the ONNX packages

    import export
    import onnx_backend
    try:
        if device.type != "cpu":
            raise UserError("ONNX Runtime is measured with --device cpu")
        export.require_export_modules(exporter)
    except UserError as error:
        print(f"onnx: skipped ({error})")
        return {"onnx_skipped": str(error)}
    torch.manual_seed(0)
    base = FCN(model_config(plan, table.num_classes)).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.onnx"
        export.export_graph(base, path, exporter, export.OPSET)
        export.annotate(path, base, table, path, exporter)
        models = {"eager": prepare(copy.deepcopy(base), modes["eager"], device),
                  "fast": prepare(copy.deepcopy(base), modes["fast"], device),
                  "onnx": onnx_backend.load_onnx(path, table, device)}
        timing = measure_infer(models, {**modes, "onnx": Mode("onnx")}, plan, device, table.num_classes)
    result = {key: value for key, value in timing.items() if key.startswith("infer_onnx_")}
    result.update({f"onnx_block_{key[len('infer_'):]}": value for key, value in timing.items()
                   if key.startswith(("infer_eager_", "infer_fast_"))})
    result["onnx_speedup"] = result["infer_onnx_img_s"] / result["onnx_block_eager_img_s"]
    result["onnx_vs_fast"] = result["infer_onnx_img_s"] / result["onnx_block_fast_img_s"]
    result["onnx_runtime"] = (f"onnxruntime {onnx_backend.import_onnxruntime().__version__} "
                              f"{models['onnx'].providers[0]}, {torch.get_num_threads()} intra-op threads, "
                              f"{exporter} export")
    print(f"onnx: {result['onnx_runtime']}; inference {size(list(plan.infer_size))} batch {plan.infer_batch}: "
          f"ORT {result['infer_onnx_img_s']:.2f} img/s, eager fp32 {result['onnx_block_eager_img_s']:.2f}, "
          f"fast {result['onnx_block_fast_img_s']:.2f} (ORT/eager {result['onnx_speedup']:.2f}x, ORT/fast "
          f"{result['onnx_vs_fast']:.2f}x); batch-1 latency ORT {result['infer_onnx_latency_ms']:.0f} ms, eager "
          f"{result['onnx_block_eager_latency_ms']:.0f} ms, fast {result['onnx_block_fast_latency_ms']:.0f} ms")
    return result


if __name__ == "__main__":
    cfg.run_script(lambda: main(get_args_parser().parse_args()))
