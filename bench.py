"""Throughput benchmark: data pipeline, FCN-8s train step and inference, eager fp32 vs the fast path.

`python bench.py --help`. Prints a table, then one JSON object as the last line (also written to --json).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import multiprocessing
import os
import resource
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NoReturn

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.flop_counter import FlopCounterMode

import cfg
import devices
import inference
import train
from cfg import UserError
from dataset import (CamVidDataset, ClassTable, LabelCache, SeededSampler, add_label_cache_args, check_data_root,
                     label_cache_from_args, resolve_class_dict)
from fcn import BACKBONES, FCN, FCNConfig
from transforms import Compose, eval_transform, train_transform

DATA_BATCH = 8  # the train loader's default batch
MATMUL_SIDE = 8192  # bf16 n×n matmuls that define the measured peak for MFU
MATMUL_WARMUP_S = 0.2  # clocks and cuBLAS heuristics settle within this; 3 calls of 1 ms do not
RECIPE = "camvid"  # train.RECIPES entry whose augmentation data_recipe_img_s measures
DATA_HEADROOM = 2  # workers_needed keeps the loaders this many times ahead of the fast train step

# Vendor dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, matched against
# torch.cuda.get_device_name (upper-cased): the first entry whose words all occur wins. Sources: the
# Hopper whitepaper (H100 SXM5 989.4, H100 PCIe 756); NVIDIA's datasheets quote bf16 with sparsity,
# halved here: H100 NVL and H200 NVL 1,671 -> 835.5, H200 and GH200 1,979 -> the SXM5's 989.4; A100
# 312 (SXM4 and PCIe alike). "NVIDIA H100 80GB HBM3" is the SXM5 board; a bare "H100" is left unknown.
SPEC_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.5),
    (("H100", "HBM3"), 989.4),
    (("H100", "SXM"), 989.4),
    (("H200", "NVL"), 835.5),
    (("H200",), 989.4),
    (("A100",), 312.0),
)


@dataclass
class Plan:
    """Sizes, batches and repetition counts of one run."""

    train_size: tuple[int, int]
    train_batch: int
    infer_size: tuple[int, int]
    infer_batch: int
    fc_width: int
    warmup: int  # untimed calls before the timed blocks
    steps: int  # calls per timed block
    repeats: int  # timed blocks per mode; medians are reported
    data_epochs: int  # timed passes over each split (after one warm-up pass)


# Full size on CUDA; on a CPU the train step runs at half size with a narrower fc6/fc7 so the whole
# bench ends in a few minutes; --quick is a seconds-long smoke run.
PLANS = {
    "cuda": Plan(cfg.CROP_SIZE, 8, cfg.EVAL_SIZE, 8, 4096, warmup=5, steps=20, repeats=5, data_epochs=3),
    "cpu": Plan((176, 240), 2, cfg.EVAL_SIZE, 2, 1024, warmup=1, steps=1, repeats=5, data_epochs=3),
    "quick": Plan((32, 64), 1, (32, 64), 1, 32, warmup=1, steps=1, repeats=1, data_epochs=1),
}


@dataclass
class Mode:
    """One way of running the model: plain eager fp32, or the project's fast path."""

    name: str
    amp: torch.dtype | None = None
    channels_last: bool = False
    fused: bool = False
    cudnn_benchmark: bool = False
    compile: bool = False

    def describe(self) -> str:
        """e.g. 'bfloat16 + channels_last + fused + cudnn_benchmark'."""
        dtype = str(self.amp).replace("torch.", "") if self.amp else "fp32"
        flags = [dtype, "channels_last" if self.channels_last else "contiguous"]
        flags += [name for name in ("fused", "cudnn_benchmark", "compile") if getattr(self, name)]
        return " + ".join(flags)


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
    return Mode("fast", devices.amp_dtype(device, args.amp), args.channels_last, fused=cuda, cudnn_benchmark=cuda,
                compile=args.compile)


# ---------------------------------------------------------------- timing helpers

def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds for `calls` back-to-back calls, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def side_by_side(runs: dict[str, Callable[[], object]], plan: Plan, device: torch.device) -> dict[str, dict]:
    """Warm every run up, then alternate their timed blocks; median seconds per call and, per run, the GPU peak
    above what was allocated at the reset: the other runs' weights, gradients and optimizer state stay allocated
    and would otherwise count in every run's peak."""
    for fn in runs.values():
        timed(fn, plan.warmup, device)
    seconds = {name: [] for name in runs}
    peaks = {name: 0.0 for name in runs}
    for _ in range(plan.repeats):
        for name, fn in runs.items():
            base = 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device) / 2 ** 20
            seconds[name].append(timed(fn, plan.steps, device) / plan.steps)
            peaks[name] = max(peaks[name], (gpu_peak_mb(device) or 0.0) - base)
    return {name: {"seconds": statistics.median(seconds[name]),
                   "peak_mb": peaks[name] if device.type == "cuda" else None} for name in runs}


def gpu_peak_mb(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated in MiB since the last reset (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def process_peak_mb(device: torch.device, run_peak: float) -> float:
    """Peak of the run: GPU memory allocated by torch, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return max(run_peak, gpu_peak_mb(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- data pipeline

def remember_pid(slot, worker_id: int) -> None:
    """worker_init_fn: publish the worker's pid so the parent can read its CPU time."""
    slot.value = os.getpid()


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds of a process from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_rate(dataset: CamVidDataset, sampler: Sampler | None, epochs: int, pin: bool) -> tuple[float, float | None]:
    """Median images/s of one worker process over `epochs` passes (file to collated uint8 batch), by the
    wall clock and per CPU-second of the worker (the latter barely moves when other jobs share the cores)."""
    pid = multiprocessing.Value("i", 0)
    loader = DataLoader(dataset, DATA_BATCH, sampler=sampler, num_workers=1, pin_memory=pin,
                        persistent_workers=True, worker_init_fn=functools.partial(remember_pid, pid))
    wall, cpu = [], []
    for epoch in range(epochs + 1):  # pass 0 starts the worker and fills the page cache
        if isinstance(sampler, SeededSampler):
            sampler.set_epoch(epoch)
        start, start_cpu = time.perf_counter(), cpu_seconds(pid.value)
        count = sum(len(images) for images, _ in loader)
        end_cpu = cpu_seconds(pid.value)
        if epoch > 0:
            wall.append(count / (time.perf_counter() - start))
            if start_cpu is not None and end_cpu is not None and end_cpu > start_cpu:
                cpu.append(count / (end_cpu - start_cpu))
    return statistics.median(wall), statistics.median(cpu) if cpu else None


def recipe_transform(recipe: str = RECIPE) -> Compose:
    """The train augmentation of `train.py --recipe RECIPE`, built with the arguments train.build_loaders uses."""
    args = train.parse_args(["--recipe", recipe])
    return train_transform(tuple(args.crop_size), args.scale, args.random_crop, args.flip, args.jitter,
                           args.downscale)


def measure_data(root: str, table: ClassTable, plan: Plan, device: torch.device, labels: LabelCache | None) -> dict:
    """Loader throughput of the centre-crop train transform and of the recipe's augmentation (seeded
    sampler, as train.py), of the eval transform, and of the centre crop without the label cache (every
    mask decoded and hash-encoded, as in a first epoch)."""
    pin = device.type == "cuda"
    train_set = CamVidDataset(root, "train", table, train_transform(), label_cache=labels)
    recipe_set = CamVidDataset(root, "train", table, recipe_transform(), label_cache=labels)
    uncached = CamVidDataset(root, "train", table, train_transform())
    val_set = CamVidDataset(root, "val", table, eval_transform(), label_cache=labels)
    result = {}
    for name, dataset, sampler in (("train", train_set, SeededSampler(train_set)),
                                   ("recipe", recipe_set, SeededSampler(recipe_set)), ("eval", val_set, None),
                                   ("train_nocache", uncached, SeededSampler(uncached))):
        result[f"data_{name}_img_s"], result[f"data_{name}_cpu_img_s"] = loader_rate(dataset, sampler,
                                                                                   plan.data_epochs, pin)
    return result


# ---------------------------------------------------------------- model, FLOPs, steps

def model_config(plan: Plan, num_classes: int) -> FCNConfig:
    """FCN-8s on VGG16-BN, the project's default model, at the plan's fc6/fc7 width."""
    return FCNConfig("fcn8s", "vgg16_bn", num_classes, plan.fc_width)


def synthetic_batch(batch: int, size: tuple[int, int], num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images and labels (about 5% void), as the loader would hand them over."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (batch, *size), dtype=torch.uint8, generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.05] = cfg.IGNORE_INDEX
    return images, labels


def count_flops(model: FCN, batch: int, size: tuple[int, int], training: bool) -> int:
    """FLOPs per image counted by FlopCounterMode (on a meta-device model nothing runs): forward, plus
    backward when training."""
    device = next(model.parameters()).device
    images = torch.zeros(batch, 3, *size, device=device)
    labels = torch.zeros(batch, *size, dtype=torch.long, device=device)
    model.train(training)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(training):
        logits = model(images)
        if training:
            train.SegmentationLoss()(logits, labels).backward()
    return counter.get_total_flops() // batch


def prepare(model: FCN, mode: Mode, device: torch.device) -> torch.nn.Module:
    """Place the model as train.setup does for this mode (memory format, then torch.compile)."""
    model.to(device, memory_format=torch.channels_last if mode.channels_last else torch.contiguous_format)
    return torch.compile(model) if mode.compile else model


def train_step(model: torch.nn.Module, mode: Mode, device: torch.device,
               batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    """One train_one_epoch step: to_device then train.train_step (forward, loss, backward, optimizer step)."""
    loop = train.Loop(device, mode.amp, mode.channels_last)
    options = train.get_args_parser().parse_args([])  # train.py's optimiser defaults (Adam)
    options.fused = mode.fused
    optimizer = train.build_optimizer(model, options, device)
    scaler = torch.amp.GradScaler(device.type, enabled=mode.amp == torch.float16)
    loss_fn = train.SegmentationLoss().to(device)
    host_images, host_labels = (t.pin_memory() for t in batch) if device.type == "cuda" else batch

    def step() -> None:
        torch.backends.cudnn.benchmark = mode.cudnn_benchmark
        images, labels = train.to_device(host_images, host_labels, loop)
        train.train_step(model, images, labels, optimizer, scaler, loss_fn, loop)
    return step


def infer_call(model: torch.nn.Module, mode: Mode, device: torch.device, images: torch.Tensor) -> Callable[[], None]:
    """One batch through inference.Runner, the path test.py and predict.py take: normalise, model under
    autocast, float logits, argmax."""
    images = images.to(device)
    runner = inference.Runner(model, device, mode.amp, mode.channels_last)

    def call() -> None:
        torch.backends.cudnn.benchmark = mode.cudnn_benchmark
        runner.labels(images)
    return call


def matmul_peak_tflops(device: torch.device, side: int) -> float:
    """bf16 side×side matmul TFLOP/s measured now, after MATMUL_WARMUP_S of back-to-back calls."""
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b, out = torch.randn_like(a), torch.empty_like(a)

    def call() -> None:
        torch.mm(a, b, out=out)
    warm_up(call, MATMUL_WARMUP_S, device)
    seconds = statistics.median(timed(call, 10, device) / 10 for _ in range(5))
    return 2 * side ** 3 / seconds / 1e12


def warm_up(fn: Callable[[], object], seconds: float, device: torch.device) -> int:
    """Call fn until at least `seconds` have passed, GPU work included; returns the number of calls."""
    calls, spent = 0, 0.0
    while spent < seconds:
        spent += timed(fn, 1, device)
        calls += 1
    return calls


def spec_peak_tflops(name: str) -> float | None:
    """The vendor's dense bf16 peak of a GPU named as torch.cuda.get_device_name does (None if unknown)."""
    words = name.upper()
    return next((tflops for keys, tflops in SPEC_BF16_TFLOPS if all(key in words for key in keys)), None)


def workers_needed(train_img_s: float | None, data_img_s: float | None) -> int | None:
    """DataLoader workers that keep the data DATA_HEADROOM× ahead of training (None if either is unknown)."""
    if not train_img_s or not data_img_s:
        return None
    return math.ceil(DATA_HEADROOM * train_img_s / data_img_s)


# ---------------------------------------------------------------- the measurements

def time_train_steps(models: dict[str, torch.nn.Module], modes: dict[str, Mode], plan: Plan,
                     device: torch.device, num_classes: int) -> dict[str, dict]:
    """side_by_side timing of each model's train step on one synthetic batch (gradients freed after)."""
    batch = synthetic_batch(plan.train_batch, plan.train_size, num_classes)
    for model in models.values():
        model.train()
    timing = side_by_side({name: train_step(models[name], modes[name], device, batch) for name in models},
                          plan, device)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return timing


def measure_train(models: dict[str, torch.nn.Module], modes: dict[str, Mode], plan: Plan,
                  device: torch.device, num_classes: int) -> dict:
    """Train-step images/s of every mode, timed side by side on one synthetic batch."""
    timing = time_train_steps(models, modes, plan, device, num_classes)
    result = {f"train_{name}_img_s": plan.train_batch / t["seconds"] for name, t in timing.items()}
    result.update({f"train_{name}_peak_mem_mb": t["peak_mb"] for name, t in timing.items()})
    result["train_speedup"] = result["train_fast_img_s"] / result["train_eager_img_s"]
    return result


def measure_infer(models: dict[str, torch.nn.Module], modes: dict[str, Mode], plan: Plan,
                  device: torch.device, num_classes: int) -> dict:
    """Inference throughput at infer_batch and batch-1 latency (each call timed alone) of every mode."""
    for model in models.values():
        model.eval()
    images = synthetic_batch(plan.infer_batch, plan.infer_size, num_classes)[0]
    single = images[:1].clone()
    throughput = side_by_side({name: infer_call(models[name], modes[name], device, images) for name in models},
                              plan, device)
    one_at_a_time = replace(plan, steps=1, repeats=plan.repeats * plan.steps)
    latency = side_by_side({name: infer_call(models[name], modes[name], device, single) for name in models},
                           one_at_a_time, device)
    result = {}
    for name in models:
        result[f"infer_{name}_img_s"] = plan.infer_batch / throughput[name]["seconds"]
        result[f"infer_{name}_latency_ms"] = 1000 * latency[name]["seconds"]
    result["infer_speedup"] = result["infer_fast_img_s"] / result["infer_eager_img_s"]
    peaks = [t["peak_mb"] for t in (*throughput.values(), *latency.values()) if t["peak_mb"] is not None]
    result["infer_peak_mem_mb"] = max(peaks) if peaks else None
    return result


def measure_models(plan: Plan, modes: dict[str, Mode], device: torch.device, num_classes: int,
                   matmul_side: int) -> dict:
    """Train step, inference, FLOPs and MFU for the eager and fast copies of one FCN-8s."""
    config = model_config(plan, num_classes)
    torch.manual_seed(0)
    base = FCN(config)
    models = {name: prepare(copy.deepcopy(base), mode, device) for name, mode in modes.items()}
    del base
    result = measure_train(models, modes, plan, device, num_classes)
    result.update(measure_infer(models, modes, plan, device, num_classes))
    with torch.device("meta"):  # counting is device independent; the meta device makes it free
        meta_model = FCN(config)
    result["flops_per_img"] = count_flops(meta_model, plan.train_batch, plan.train_size, training=True)
    result["infer_flops_per_img"] = count_flops(meta_model, 1, plan.infer_size, training=False)
    for name in modes:
        result[f"train_{name}_tflops"] = result["flops_per_img"] * result[f"train_{name}_img_s"] / 1e12
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    matmul = matmul_peak_tflops(device, matmul_side) if gpu else None  # MFU is a GPU figure
    result.update(efficiency(result["train_fast_tflops"], matmul, gpu))
    return result


def efficiency(train_tflops: float, matmul_tflops: float | None, gpu: str | None) -> dict:
    """MFU of the fast train step against the measured matmul peak and against the GPU's spec peak."""
    spec = spec_peak_tflops(gpu) if gpu else None
    return {"matmul_peak_tflops": matmul_tflops, "mfu": train_tflops / matmul_tflops if matmul_tflops else None,
            "spec_peak_tflops": spec, "mfu_spec": train_tflops / spec if spec else None}


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


def backbone_config(backbone: str, plan: Plan, num_classes: int) -> FCNConfig:
    """FCN-8s on a backbone: VGG's fc6/fc7 at the plan's width, the others at their classifier's own."""
    width = plan.fc_width if backbone.startswith("vgg") else None
    return FCNConfig("fcn8s", backbone, num_classes, width)


def measure_backbones(names: list[str], plan: Plan, mode: Mode, device: torch.device, num_classes: int) -> dict:
    """The fast path's train-step and inference images/s of FCN-8s on each backbone (the plan's sizes and
    batches, all backbones' blocks alternating), with parameters and FLOPs per image."""
    if not names:
        return {}
    models, result = {}, {}
    for name in names:
        torch.manual_seed(0)
        config = backbone_config(name, plan, num_classes)
        models[name] = prepare(FCN(config), mode, device)
        with torch.device("meta"):
            meta_model = FCN(config)
        result[name] = {"fc_width": config.width, "params_m": sum(p.numel() for p in meta_model.parameters()) / 1e6,
                        "train_gflops_per_img": count_flops(meta_model, plan.train_batch, plan.train_size, True) / 1e9,
                        "infer_gflops_per_img": count_flops(meta_model, 1, plan.infer_size, False) / 1e9}
    trained = time_train_steps(models, dict.fromkeys(names, mode), plan, device, num_classes)
    for model in models.values():
        model.eval()
    images = synthetic_batch(plan.infer_batch, plan.infer_size, num_classes)[0]
    infer = side_by_side({name: infer_call(models[name], mode, device, images) for name in names}, plan, device)
    for name in names:
        result[name].update(train_img_s=plan.train_batch / trained[name]["seconds"],
                            infer_img_s=plan.infer_batch / infer[name]["seconds"])
    return result


# ---------------------------------------------------------------- report

def number(value: float | None, unit: str = "", digits: int = 1) -> str:
    """A table cell: thousands separators, or n/a for what was not measured."""
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def size(hw: list[int]) -> str:
    """[H, W] -> 'HxW'."""
    return f"{hw[0]}x{hw[1]}"


def ratio(slower: float | None, faster: float | None) -> str:
    """'1.23x' for faster/slower, blank when either is missing."""
    return "" if slower is None or faster is None else f"{faster / slower:.2f}x"


def data_rows(r: dict) -> list[tuple[str, ...]]:
    """(what, wall clock, per worker CPU-second) rows of the data pipeline table."""
    common = f"1 worker, batch {r['data_batch']}, uint8"
    cache = "label cache warm after pass 0" if r["label_cache"] else "no label cache"
    return [(f"data pipeline ({cache})", "img/s (wall)", "img/s per CPU-s", ""),
            (f"train transform, centre crop {size(cfg.CROP_SIZE)} ({common})", number(r["data_train_img_s"]),
             number(r["data_train_cpu_img_s"]), ""),
            (f"train transform, --recipe {RECIPE} augmentation ({common})",
             number(r["data_recipe_img_s"]), number(r["data_recipe_cpu_img_s"]), ""),
            (f"eval transform, full image ({common})", number(r["data_eval_img_s"]),
             number(r["data_eval_cpu_img_s"]), ""),
            (f"train transform without the label cache ({common})", number(r["data_train_nocache_img_s"]),
             number(r["data_train_nocache_cpu_img_s"]), "")]


def model_rows(r: dict) -> list[tuple[str, ...]]:
    """(what, eager fp32, fast path, speedup) rows of the model table; speedup > 1 means the fast path wins."""
    rows = [("model", "eager fp32", "fast path", "speedup")]
    for key, what, unit, digits in (
            ("train_{}_img_s", f"train step {size(r['train_size'])} batch {r['train_batch']}", " img/s", 2),
            ("infer_{}_img_s", f"inference {size(r['infer_size'])} batch {r['infer_batch']}", " img/s", 2),
            ("infer_{}_latency_ms", f"inference {size(r['infer_size'])} batch 1 latency", " ms", 1),
            ("train_{}_tflops", "train step achieved", " TFLOP/s", 3),
            ("train_{}_peak_mem_mb", "train step peak GPU memory above its start", " MiB", 0)):
        eager, fast = r[key.format("eager")], r[key.format("fast")]
        speedup = "" if "mem" in key else ratio(fast, eager) if "latency" in key else ratio(eager, fast)
        rows.append((what, number(eager, unit, digits), number(fast, unit, digits), speedup))
    mfu, mfu_spec = (None if r[key] is None else 100 * r[key] for key in ("mfu", "mfu_spec"))
    memory = "GPU, torch allocated" if r["device"] == "cuda" else "CPU, peak RSS of the main process"
    return rows + [
        (f"FLOPs/img, train step fwd+bwd {size(r['train_size'])}", number(r["flops_per_img"] / 1e9, " GFLOP"), "", ""),
        (f"FLOPs/img, inference fwd {size(r['infer_size'])}", number(r["infer_flops_per_img"] / 1e9, " GFLOP"), "", ""),
        (f"bf16 {r['matmul_side']}x{r['matmul_side']} matmul peak", number(r["matmul_peak_tflops"], " TFLOP/s"), "", ""),
        ("bf16 dense peak, vendor spec", number(r["spec_peak_tflops"], " TFLOP/s"), "", ""),
        ("MFU of the fast train step vs the measured matmul", "", number(mfu, " %"), ""),
        ("MFU of the fast train step vs the spec peak", "", number(mfu_spec, " %"), ""),
        (f"workers for {DATA_HEADROOM}x the fast train step (recipe augmentation)",
         "", "n/a" if r["workers_needed"] is None else str(r["workers_needed"]), ""),
        (f"peak memory ({memory})", number(r["peak_mem_mb"], " MiB", 0), "", "")]


def backbone_rows(r: dict) -> list[tuple[str, ...]]:
    """(backbone, train img/s, inference img/s, parameters) rows of the fast path on every backbone."""
    rows = [(f"FCN-8s per backbone, fast path: train {size(r['train_size'])} batch {r['train_batch']}, inference "
             f"{size(r['infer_size'])} batch {r['infer_batch']}", "train img/s", "infer img/s", "params")]
    for name, row in r["backbones"].items():
        width = f", fc {row['fc_width']}" if row["fc_width"] else ""
        rows.append((f"{name}{width} ({row['train_gflops_per_img']:.1f} GFLOP/img train)",
                     number(row["train_img_s"], "", 2), number(row["infer_img_s"], "", 2),
                     f"{row['params_m']:.1f}M"))
    return rows


def print_report(r: dict) -> None:
    """The human-readable tables."""
    print(f"bench.py on {r['device']} ({r['device_name']}), torch {r['torch']}, {r['date']}")
    print(f"model: FCN-8s {r['backbone']} fc_width {r['fc_width']}" +
          (" (narrowed from the paper's 4096 to keep the run short)" if r["fc_width"] != 4096 else ""))
    same = r["fast_path"] == r["eager_path"]
    print(f"eager: {r['eager_path']}, non-fused Adam | fast path: {r['fast_path']}" +
          (" (= eager: --no-channels-last, and no AMP on this device)" if same else ""))
    if r["device"] == "cuda":
        print(f"eager fp32 keeps PyTorch's TF32 defaults (its convolutions run in TF32 on Ampere and later): "
              f"cuDNN conv {r['tf32_conv']}, matmul {r['tf32_matmul']}")
    print(f"timing: medians of {r['repeats']} alternating eager/fast blocks of {r['steps']} call(s) after warm-up")
    rows = [*data_rows(r), ("", "", "", ""), *model_rows(r)]
    if r["backbones"]:
        rows += [("", "", "", ""), *backbone_rows(r)]
    width = max(len(row[0]) for row in rows)
    for what, first, second, third in rows:
        print(f"{what:<{width}}  {first:>16}  {second:>16}  {third:>8}".rstrip())


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
    result.update(measure_data(args.data_root, table, plan, device, label_cache_from_args(args)))
    result["matmul_side"] = 1024 if args.quick else MATMUL_SIDE
    result.update(measure_models(plan, modes, device, table.num_classes, result["matmul_side"]))
    # Only a GPU's train rate says how many workers a real run needs; the CPU plan is a smaller model.
    cuda = device.type == "cuda"
    result["workers_needed"] = workers_needed(result["train_fast_img_s"], result["data_recipe_img_s"]) if cuda else None
    peaks = [result["train_eager_peak_mem_mb"], result["train_fast_peak_mem_mb"], result["infer_peak_mem_mb"]]
    result["peak_mem_mb"] = process_peak_mb(device, max((p for p in peaks if p is not None), default=0.0))
    result["backbones"] = measure_backbones(backbones, plan, modes["fast"], device, table.num_classes)
    if args.onnx:
        result.update(bench_onnx(plan, modes, device, table, "torchscript" if args.quick else "dynamo"))
    print_report(result)
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
