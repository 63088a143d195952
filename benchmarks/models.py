"""The model measurements: FLOPs, the train step and inference of eager fp32 and the fast path, the matmul peak and
MFU, and FCN-8s on each backbone."""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import replace
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import cfg
import inference
from benchmarks.plan import DATA_HEADROOM, MATMUL_WARMUP_S, SPEC_BF16_TFLOPS, Mode, Plan
from benchmarks.timing import side_by_side, timed, warm_up
from engine.build import build_optimizer
from engine.loss import SegmentationLoss
from engine.run import Runtime
from engine.settings import OptimSettings
from engine.step import to_device
from engine.step import train_step as one_train_step
from fcn import FCN, FCNConfig


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
            SegmentationLoss()(logits, labels).backward()
    return counter.get_total_flops() // batch


def prepare(model: FCN, mode: Mode, device: torch.device) -> torch.nn.Module:
    """Place the model as engine.build does for this mode (memory format, then torch.compile)."""
    model.to(device, memory_format=torch.channels_last if mode.channels_last else torch.contiguous_format)
    return torch.compile(model) if mode.compile else model


def train_step(model: torch.nn.Module, mode: Mode, device: torch.device,
               batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    """One train_one_epoch step: to_device then engine.step.train_step (forward, loss, backward, optimizer step)."""
    runtime = Runtime(device, mode.amp, mode.channels_last)
    optimizer = build_optimizer(model, OptimSettings(fused=mode.fused), device)  # train.py's defaults (Adam)
    scaler = torch.amp.GradScaler(device.type, enabled=mode.amp == torch.float16)
    loss_fn = SegmentationLoss().to(device)
    host_images, host_labels = (t.pin_memory() for t in batch) if device.type == "cuda" else batch

    def step() -> None:
        torch.backends.cudnn.benchmark = mode.cudnn_benchmark
        images, labels = to_device(host_images, host_labels, runtime)
        one_train_step(model, images, labels, optimizer, scaler, loss_fn, runtime)
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


def spec_peak_tflops(name: str) -> float | None:
    """The vendor's dense bf16 peak of a GPU named as torch.cuda.get_device_name does (None if unknown)."""
    words = name.upper()
    return next((tflops for keys, tflops in SPEC_BF16_TFLOPS if all(key in words for key in keys)), None)


def workers_needed(train_img_s: float | None, data_img_s: float | None) -> int | None:
    """DataLoader workers that keep the data DATA_HEADROOM× ahead of training (None if either is unknown)."""
    if not train_img_s or not data_img_s:
        return None
    return math.ceil(DATA_HEADROOM * train_img_s / data_img_s)


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
