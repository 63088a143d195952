"""Train FCN-32s/16s/8s on CamVid: `python train.py --help`."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import budget as time_budget
import cfg
import devices
import inference
import run_folder
from budget import Budget, BudgetTooSmall, Schedule, format_duration
from cfg import UserError
from dataset import (CamVidDataset, ClassTable, SeededSampler, ShardSampler, add_label_cache_args,
                     check_data_root, label_cache_from_args, normalize_batch, parse_splits,
                     resolve_class_dict)
from fcn import BACKBONES, FCN, VARIANTS, FCNConfig, check_pretrainable, load_pretrained, upgrade_state_dict
from devices import unwrap, wrappers
from engine.ema import WeightAverage
from engine.loss import SegmentationLoss, class_weights, nonzero
from run_folder import set_times
from transforms import eval_transform, train_transform

# `--recipe camvid`: the defaults chosen for CamVid; explicit flags still win.
RECIPES = {
    "camvid": dict(optimizer="sgd", lr=0.01, weight_decay=5e-4, schedule="poly", warmup_epochs=5,
                   epochs=300, batch_size=8, scale=(0.5, 2.0), flip=True, jitter=0.2, clip_grad=10.0),
}
# The CamVid recipe for an hour of a CPU, chosen by short runs scored at 360x480 (docs/results.md):
# MobileNetV3-Large at quarter resolution saw the most epochs and scored best, with a 10x higher lr. Its depthwise
# convolutions train faster in fp32 than in CPU bf16, and the decoded images fit in memory (--cache).
RECIPES["camvid-cpu"] = dict(RECIPES["camvid"], backbone="mobilenet_v3_large", downscale=4.0, crop_size=[88, 120],
                             lr=0.1, warmup_epochs=2, epochs=1000, eval_every=2, time_budget="60m", amp=False,
                             cache=True)
RECIPE_NOTES = {"camvid": "the full recipe for a CUDA GPU (FCN-8s on VGG16-BN at CamVid's full resolution, 300 epochs)",
                "camvid-cpu": "the recipe for a machine without a CUDA GPU (FCN-8s on MobileNetV3-Large, 60 minutes at "
                              "quarter resolution)"}


class TrainingDiverged(Exception):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class Pace:
    """This process's training pace from its first optimizer step on (what came before is one-off), and the
    whole-run estimate it gives once, after the first few steps."""

    first_step_end: float | None = None
    steps: int = 0
    tell: Callable[[float], None] | None = None  # prints the estimate from the seconds per step (rank 0)

    def step_done(self) -> None:
        self.steps += 1
        if self.first_step_end is None:
            self.first_step_end = time.perf_counter()

    def maybe_tell(self) -> None:
        """At a host sync (the clock then means something on a GPU too): the estimate, once 3 steps are timed."""
        if self.tell is not None and self.steps >= 4:
            self.tell((time.perf_counter() - self.first_step_end) / (self.steps - 1))
            self.tell = None


@dataclass
class Loop:
    """What the train/eval loops need to know besides the model and data."""

    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    dist: devices.DistInfo = field(default_factory=devices.DistInfo)
    stop: devices.StopFlag = field(default_factory=devices.StopFlag)
    log_every: int = 10
    clip_grad: float = 0.0
    seed: int = 0
    compile: bool = False  # the model is torch.compile'd: mark the batch dimension dynamic
    accum_steps: int = 1  # batches per optimizer step
    budget: Budget | None = None  # --time-budget: rank 0 plans, every rank follows the agreed plan
    pace: Pace = field(default_factory=Pace)
    aux_weight: float = 0.0  # deep supervision: the weight of each coarser output's loss
    average: WeightAverage | None = None  # --ema: updated after every optimizer step


def to_device(images: torch.Tensor, labels: torch.Tensor, loop: Loop) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch -> normalised float images and long labels on the device (copies overlap compute)."""
    images = images.to(loop.device, non_blocking=True)
    labels = labels.to(loop.device, non_blocking=True)
    return normalize_batch(images, loop.channels_last), labels.long()


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, loss_fn: nn.Module, loop: Loop,
                    epoch: int, done: dict) -> bool:
    """One pass over the loader, an optimizer step per --accum-steps batches, ending early at the schedule's
    last step; `done` carries the optimizer steps, loss_sum and count (also across a resume). Returns False
    when the ranks agreed to stop (a signal, or a budget whose measured epoch did not fit)."""
    model.train()
    loss_sum = torch.full((), done["loss_sum"], device=loop.device, dtype=torch.float64)  # no host sync
    bar = tqdm(loader, desc=epoch_label(epoch, scheduler.lr_lambdas[0]), disable=not loop.dist.is_main,
               dynamic_ncols=True)
    steps = math.ceil(len(loader) / loop.accum_steps)  # left in this epoch
    for step, group in enumerate(batch_groups(bar, loop.accum_steps), 1):
        batches = [to_device(images, labels, loop) for images, labels in group]
        loss = accumulation_step(model, batches, optimizer, scaler, loss_fn, loop, epoch, done["steps"])
        scheduler.step()
        images_in_step = sum(len(labels) for _, labels in batches)
        loss_sum += loss.double() * images_in_step
        done["steps"] += 1
        done["count"] += images_in_step
        # Stops fall between optimizer steps only: no half-accumulated gradient is ever lost. At the loader's
        # end the loop ends by itself (and the bar shows the whole epoch).
        if between_steps(loop, scheduler, loss_sum, done, epoch, bar) and (step < steps or loop.stop.stopping):
            break
    done["loss_sum"] = on_host(loss_sum)
    return not loop.stop.stopping


def on_host(loss_sum: torch.Tensor) -> float:
    """The epoch's loss sum as a number: the training loop's one host sync besides the --log-every steps."""
    return loss_sum.item()


def epoch_label(epoch: int, schedule: Schedule) -> str:
    """'epoch 5/109' (the planned count; none while a budget measures its first epoch)."""
    return f"epoch {epoch}/{schedule.epochs}" if schedule.total is not None else f"epoch {epoch}"


def between_steps(loop: Loop, scheduler, loss_sum: torch.Tensor, done: dict, epoch: int, bar) -> bool:
    """After an optimizer step: at every --log-every steps check and show the loss (the loop's only host sync);
    at the agreement points (every step in one process, every --log-every steps under torchrun) take the ranks'
    one decision: a stop, a divergence, rank 0's plan. True: this epoch's training ends here."""
    step, logging = scheduler.last_epoch, done["steps"] % loop.log_every == 0
    loop.pace.step_done()
    if loop.budget is not None:
        loop.budget.step_done()
    if loop.dist.enabled and not logging:
        return False
    finite = True
    if logging:
        loss = loss_sum.item()
        finite = math.isfinite(loss)
        bar.set_postfix(loss=f"{loss / done['count']:.4f}")
        loop.pace.maybe_tell()
    total = scheduler.lr_lambdas[0].total
    if loop.budget is not None and loop.dist.is_main:
        total, deadline = loop.budget.in_epoch(step, epoch, logging, loop.log_every if loop.dist.enabled else 0)
        if deadline:
            loop.stop.request("time budget")
    (stops, nonfinite), (total,) = devices.agree(loop.device, loop.dist, [loop.stop.requested, not finite],
                                                 [end_code(total)])
    if nonfinite:
        raise TrainingDiverged(f"loss became NaN/inf in epoch {epoch} by step {done['steps']}")
    if loop.stop.agreed(stops > 0):
        return True
    follow_plan(loop, scheduler, step, total)
    return at_end(scheduler)


def end_code(total: int | None) -> float:
    """A planned last step as a number every rank can sum (-1: not planned yet)."""
    return -1.0 if total is None else float(total)


def follow_plan(loop: Loop, scheduler, step: int, code: float) -> None:
    """Take the agreed last step (rank 0's plan): the budget records it, the schedule re-plans from `step`,
    and the next step runs at the re-planned rate."""
    if loop.budget is None or code < 0 or not loop.budget.follow(int(code), step):
        return
    schedule = scheduler.lr_lambdas[0]
    schedule.replan(int(code), step)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * schedule(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def at_end(scheduler) -> bool:
    """Whether the schedule's last step is done (never while a budget measures its first epoch)."""
    total = scheduler.lr_lambdas[0].total
    return total is not None and scheduler.last_epoch >= total


def batch_groups(batches: Iterable, size: int) -> Iterator[list]:
    """Batches in lists of `size` (the epoch's last list may be shorter): one list per optimizer step."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def accumulation_step(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                      optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss_fn: nn.Module,
                      loop: Loop, epoch: int, step: int) -> torch.Tensor:
    """One optimizer step on the gradients of several batches; the detached loss of their union.
    Every batch divides its loss sum by the denominator of the whole group, so batch 2 x 4 steps makes
    the gradient of batch 8 (BatchNorm aside: its statistics stay per batch)."""
    denominator = nonzero(sum(loss_fn.denominator(labels) for _, labels in batches))
    optimizer.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=loop.device)
    for index, (images, labels) in enumerate(batches):
        # Reseeded per batch (dropout masks): a run resumed at any step draws what an uninterrupted one does
        torch.manual_seed(step_seed(loop.seed, loop.dist.rank, epoch, step * loop.accum_steps + index))
        last = index == len(batches) - 1
        loss += backward(model, images, labels, scaler, loss_fn, loop, denominator, sync=last)
    optimizer_step(model, optimizer, scaler, loop)
    if loop.average is not None:
        loop.average.update()
    return loss


def backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, scaler: torch.amp.GradScaler,
             loss_fn: nn.Module, loop: Loop, denominator: torch.Tensor, sync: bool = True) -> torch.Tensor:
    """Forward under autocast and backward through the scaler, adding into .grad; the detached loss share of the
    final output (deep supervision's coarser outputs add to the gradient only). Under DDP only a `sync` backward
    all-reduces (then the gradients accumulated so far as well)."""
    if loop.compile:  # compile for any batch size at once: the last, smaller batch must not recompile
        torch._dynamo.maybe_mark_dynamic(images, 0)
    with gradient_sync(model, sync):
        with devices.autocast(loop.device, loop.amp):
            output = model(images, aux=True) if loop.aux_weight > 0 else model(images)
        total, loss = loss_fn.supervised(output, labels, loop.aux_weight)  # in fp32, whatever autocast ran
        scaler.scale(total / denominator).backward()
    return loss.detach() / denominator


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() for a backward that must not all-reduce yet; otherwise nothing."""
    ddp = next((layer for layer in wrappers(model) if isinstance(layer, DistributedDataParallel)), None)
    return ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   loop: Loop) -> None:
    """Optional clipping (on unscaled gradients), then the step through the scaler."""
    if loop.clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), loop.clip_grad)
    scaler.step(optimizer)
    scaler.update()


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loss_fn: nn.Module, loop: Loop) -> torch.Tensor:
    """One batch, one optimizer step (what bench.py times); the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward(model, images, labels, scaler, loss_fn, loop, nonzero(loss_fn.denominator(labels)))
    optimizer_step(model, optimizer, scaler, loop)
    return loss


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The global RNG seed (dropout) of one training step. Reseeding every step makes a run resumed at any
    step, mid-epoch included, draw the same masks as an uninterrupted one with no RNG state in last.pth;
    each rank gets its own stream."""
    key = np.random.SeedSequence([seed % 2 ** 64, rank, epoch, step])
    return int(key.generate_state(1, np.uint64)[0] >> np.uint64(1))


def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, loop: Loop) -> dict:
    """Val metrics through the project's one inference path, the one test.py scores with: a confusion matrix
    over the whole split, the mean per-pixel loss."""
    return inference.evaluate(model, loader, num_classes, loop.device, loop.amp, loop.channels_last)


def parameter_groups(model: nn.Module, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
    """Weight decay on conv/linear kernels only (biases and BatchNorm parameters are left alone); with
    backbone_lr_mult != 1 the backbone's features get groups of their own whose "lr_mult" scales the lr."""
    split = backbone_lr_mult != 1.0
    groups = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            backbone = split and name.startswith("backbone.")
            groups.setdefault((backbone, parameter.ndim > 1), []).append(parameter)
    result = []
    # Head groups first: param_groups[0] keeps the base lr, the one history.csv logs
    for backbone, decay in [(False, True), (False, False), (True, True), (True, False)]:
        if (backbone, decay) in groups:
            group = {"params": groups[backbone, decay], "weight_decay": weight_decay if decay else 0.0}
            result.append({**group, "lr_mult": backbone_lr_mult} if backbone else group)
    return result


def build_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """Adam or SGD(momentum), fused kernels on CUDA; the backbone's groups start at lr × --backbone-lr-mult."""
    if args.backbone_lr_mult < 0:
        raise UserError(f"--backbone-lr-mult: expected a factor >= 0, got {args.backbone_lr_mult}")
    groups = parameter_groups(model, args.weight_decay, args.backbone_lr_mult)
    for group in groups:  # LambdaLR scales each group's own initial lr, so the schedule applies to both
        group["lr"] = args.lr * group.pop("lr_mult", 1.0)
    fused = {"fused": True} if device.type == "cuda" and args.fused else {}
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, **fused)
    return torch.optim.Adam(groups, lr=args.lr, **fused)


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR over a budget.Schedule (scheduler.lr_lambdas[0]): linear warm-up, then poly or step
    decay; with --time-budget provisional until the measured epoch plans the last step."""
    plan = Schedule(args.schedule, steps_per_epoch, args.epochs, args.warmup_epochs, args.gamma, args.step_size,
                    total=None if args.time_budget else -1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, plan)


def build_loaders(args: argparse.Namespace, table: ClassTable, loop: Loop) -> tuple[DataLoader, DataLoader]:
    """Train loader (seeded per-epoch shuffle, sharded across ranks) and val loader (each sample once)."""
    crop = tuple(args.crop_size)
    augment = train_transform(crop, args.scale, args.random_crop, args.flip, args.jitter, args.downscale)
    labels = label_cache_from_args(args)
    train_set = CamVidDataset(args.data_root, args.train_splits, table, augment, args.limit, label_cache=labels)
    val_crop = eval_transform(crop if args.val_crop else None, args.downscale)
    val_set = CamVidDataset(args.data_root, "val", table, val_crop, args.limit, label_cache=labels)
    if args.cache:
        train_set.preload()
        val_set.preload()
    common = dict(num_workers=args.workers, pin_memory=args.pin_memory and loop.device.type == "cuda",
                  persistent_workers=args.workers > 0, worker_init_fn=devices.ignore_stop_signals)
    train_sampler = SeededSampler(train_set, loop.dist.world_size, loop.dist.rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, args.batch_size, sampler=train_sampler, **common)
    val_sampler = ShardSampler(len(val_set), loop.dist.world_size, loop.dist.rank)
    val_loader = DataLoader(val_set, args.eval_batch_size, sampler=val_sampler, **common)
    return train_loader, val_loader


def build_model(args: argparse.Namespace, table: ClassTable, resumed: dict | None) -> FCN:
    """A fresh model from the flags (plus --pretrained / --init-from), or the resumed checkpoint's."""
    if resumed is not None:
        return inference.model_from_checkpoint(resumed, table, args.out / "last.pth")
    config = FCNConfig(args.model, args.backbone, table.num_classes, args.fc_width)
    if args.pretrained:
        check_pretrainable(config)  # before building a large model or downloading anything
    model = FCN(config)
    if args.pretrained:
        load_pretrained(model, args.pretrained)
    if args.init_from:
        init_from(model, args.init_from, table)
    return model


def init_from(model: FCN, path: str, table: ClassTable) -> None:
    """Load every layer of a checkpoint whose tensors all fit (another variant or class set); the rest keeps
    its fresh initialisation (zero scoring layers, bilinear upsamplers). One line names what was not loaded."""
    state = run_folder.load_checkpoint(path)
    source, target = upgrade_state_dict(state["model"]), model.state_dict()
    layers: dict[str, list[str]] = {}
    for key in target:
        layers.setdefault(key.rsplit(".", 1)[0], []).append(key)
    # All of a layer's tensors or none: never a loaded bias on a fresh kernel
    fits = {layer: all(k in source and source[k].shape == target[k].shape for k in keys)
            for layer, keys in layers.items()}
    if not any(ok for layer, ok in fits.items() if layer.startswith("backbone.")):
        raise UserError(f"--init-from {path}: no backbone layer fits this model (another backbone?)")
    model.load_state_dict({k: source[k] for layer, keys in layers.items() if fits[layer] for k in keys},
                          strict=False)
    skipped = [layer for layer, ok in fits.items() if not ok]
    classes = state["config"].get("model", {}).get("num_classes", "?")
    print(f"--init-from {path} ({classes} classes -> {table.num_classes}): "
          + (f"not loaded, freshly initialised: {', '.join(skipped)}" if skipped else "every layer loaded"))


def fresh_progress() -> dict:
    """Progress through the epoch in progress: kept in last.pth so a resume can finish it."""
    return {"steps": 0, "loss_sum": 0.0, "count": 0, "train_seconds": 0.0}


@dataclass
class Run:
    """What fit() works on: built by setup(), advanced epoch by epoch, saved in last.pth."""

    args: argparse.Namespace
    table: ClassTable
    model: nn.Module  # maybe wrapped in DDP and/or torch.compile: unwrap() gives the FCN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    loop: Loop
    folder: run_folder.Folder
    start_epoch: int = 1
    best_miou: float = -1.0
    history: list[dict] = field(default_factory=list)
    done: dict = field(default_factory=fresh_progress)
    board: object | None = None  # --tensorboard's SummaryWriter (rank 0)

    @property
    def schedule(self) -> Schedule:
        return self.scheduler.lr_lambdas[0]

    def config(self) -> dict:
        """The configuration checkpoints and results.json record."""
        return run_folder.run_config(unwrap(self.model).config.to_dict(), self.args, self.loop.dist.world_size)

    @property
    def keep_last(self) -> bool:
        """Whether best.pth is the latest epoch rather than the best validated one (--best, resolved)."""
        return best_is_last(self.args)

    def inference_model(self) -> FCN:
        """The model that is validated and saved as best.pth: the weight average with --ema, else the trained one."""
        return self.loop.average.model if self.loop.average is not None else unwrap(self.model)


def best_is_last(args: argparse.Namespace) -> bool:
    """--best auto: the last epoch when val is trained on (its scores then choose nothing), else the best on val."""
    return args.best == "last" or (args.best == "auto" and "val" in parse_splits(args.train_splits))


def val_samples(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to 3 val images spread over the split, their labels and the model's prediction."""
    loop = run.loop
    runner = inference.Runner(run.inference_model(), loop.device, loop.amp, loop.channels_last)
    return inference.sample_predictions(runner, run.val_loader.dataset)


def validate(run: Run) -> dict:
    """Val metrics of the model every rank holds (the weight average with --ema)."""
    sync_buffers(run.inference_model(), run.loop.dist)
    # Eager and without DDP: no gradients to synchronise, and no second compiled graph (eval mode) to build.
    return evaluate(run.inference_model(), run.val_loader, run.table.num_classes, run.loop)


def end_of_epoch(run: Run, epoch: int, metrics: dict | None, val_seconds: float, final: bool) -> None:
    """Log every epoch; checkpoint, plot and draw samples when the folder's cadence says so (always at the last
    epoch and at a budget's measured one, whose write it times). best.pth is judged on validated epochs only,
    or is the latest epoch (--best last); rank 0 alone writes files."""
    started, main, budget = time.perf_counter(), run.loop.dist.is_main, run.loop.budget
    train_loss = run.done["loss_sum"] / max(1, run.done["count"])
    row = run_folder.history_row(epoch, run.optimizer.param_groups[0]["lr"], train_loss, metrics, run.table.names)
    run.history.append(row)
    improved = metrics is not None and metrics["miou"] > run.best_miou
    if improved:
        run.best_miou = metrics["miou"]
    if improved or run.keep_last:
        run.folder.best = (run_folder.best_state(run.inference_model(), run.config(), epoch, metrics,
                                                 devices.precision_name(run.loop.amp), run.table) if main else None)
    train_seconds, run.done = run.done["train_seconds"], fresh_progress()
    if not main:
        return
    print(epoch_line(run, epoch, row, train_seconds + val_seconds))
    set_times(row, train_seconds, val_seconds, time.perf_counter() - started)  # last.pth holds them too
    measuring = budget is not None and not budget.planned
    samples = val_samples(run) if metrics is not None and run.board is not None else None
    if run.folder.due(metrics is not None, final or measuring):
        writing = time.perf_counter()
        # A budget plans with what a write costs: it writes in the foreground, and the last write always is
        samples = save(run, epoch, samples, background=budget is None and not final)
        if budget is not None:
            budget.measured(save=time.perf_counter() - writing)
    set_times(row, train_seconds, val_seconds, time.perf_counter() - started)
    run_folder.write_history(run.history, run.args.out / "history.csv")  # small: every epoch
    if run.board is not None:
        log_board(run, row, samples)


def save(run: Run, epoch: int, samples: tuple | None = None, background: bool = False) -> tuple:
    """Checkpoints (in the `background` while training goes on), curves and the val samples: one complete
    folder. Returns the samples drawn."""
    progress = run_folder.Progress(epoch, run.best_miou, run.history, run.done,
                                   run.loop.budget.state() if run.loop.budget else None)
    average = run.loop.average.state_dict() if run.loop.average is not None else None
    run.folder.write_checkpoints(run_folder.checkpoint_state(unwrap(run.model), run.optimizer, run.scheduler,
                                                             run.scaler, progress, run.config(), run.table, average),
                                 background)
    if run.history:
        run_folder.plot_curves(run.history, run.args.out / "curves.png")
    samples = samples or val_samples(run)
    run_folder.write_samples(*samples, run.table, run.args.out / "val_samples.png")
    return samples


def sync_buffers(model: nn.Module, dist_info: devices.DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank: without SyncBatchNorm each
    rank's last forward updated its own copy, but validation must score the one model last.pth saves."""
    if dist_info.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train FCN on CamVid.", formatter_class=cfg.HelpFormatter)
    add = parser.add_argument
    add("--data-root", default=cfg.default_data_root(),
        help="CamVid folder: $CAMVID_ROOT when set, else data/CamVid in the working folder")
    add("--class-dict", default=None, help="class_dict.csv (default: DATA_ROOT/class_dict.csv, else data/class_dict.csv)")
    add("--recipe", choices=[*sorted(RECIPES), "auto"],
        help="set the defaults of a documented recipe; explicit flags still win (auto: camvid where the --device is "
             "a CUDA GPU, camvid-cpu elsewhere)")
    add("--model", default="fcn8s", choices=VARIANTS, help="FCN variant: the skips it fuses (docs/model.md)")
    add("--backbone", default="vgg16_bn", choices=list(BACKBONES), help="torchvision classifier under the FCN head")
    add("--fc-width", type=int, default=None,
        help="channels of the convolutionalised hidden layers, fc6/fc7 (default: the classifier's own: VGG 4096, "
             "MobileNetV3 1280; ResNets have none)")
    add("--pretrained", nargs="?", const="imagenet", default=None,
        help="the backbone's ImageNet weights: alone, torchvision's download (weights API); with PATH, the "
             "torchvision classifier's state dict on disk")
    add("--init-from", help="start from another run's checkpoint: every layer whose shape fits (e.g. the fcn32s "
        "best.pth for fcn16s, or a CamVid model for another class set)")
    add("--backbone-lr-mult", type=float, default=1.0, help="lr factor of the backbone's layers (e.g. 0.1 when fine-tuning)")
    add("--epochs", type=int, default=100, help="epochs to train (with --time-budget: the most it may choose)")
    add("--time-budget", metavar="DURATION",
        help="train the best schedule that fits: 90s, 20m, 1.5h or seconds for the whole run; after the first "
             "epoch it plans the last step that fits, plans again as the run goes and anneals the lr (poly) to 0 "
             "at that step (none: no budget, e.g. after --recipe camvid-cpu)")
    add("--batch-size", type=int, default=8, help="per process")
    add("--accum-steps", type=int, default=1, metavar="K",
        help="accumulate the gradients of K batches per optimizer step: --batch-size 2 --accum-steps 4 trains "
             "like batch 8 in a quarter of the activation memory")
    add("--eval-batch-size", type=int, default=8, help="validation batch, per process")
    add("--optimizer", default="adam", choices=("adam", "sgd"), help="biases and BatchNorm get no weight decay")
    add("--lr", type=float, default=1e-4, help="base learning rate")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--weight-decay", type=float, default=0.0, help="weight decay (not on biases and BatchNorm)")
    add("--schedule", default="step", choices=("step", "poly"),
        help="step: x --gamma every --step-size epochs; poly: polynomial decay to 0")
    add("--step-size", type=int, default=50, help="epochs between step decays")
    add("--gamma", type=float, default=0.5, help="step decay factor")
    add("--warmup-epochs", type=int, default=0, help="linear learning-rate warm-up before the schedule")
    add("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    add("--class-weights", default="none", choices=("none", "median-freq"),
        help="median-freq: SegNet's median-frequency balancing, from the training masks, capped at --class-weight-cap")
    add("--class-weight-cap", type=float, default=10.0,
        help="largest class weight of --class-weights median-freq (0: uncapped), so a class of a few pixels cannot "
             "dominate the loss")
    add("--aux-weight", type=float, default=0.0,
        help="deep supervision: add this weight x the loss of each coarser output (FCN-8s: the stride-32 and "
             "stride-16 scores, upsampled) to the training loss; inference unchanged (0: off)")
    add("--ema", type=float, default=0.0, metavar="DECAY",
        help="validate and save as best.pth an exponential moving average of the weights and BatchNorm "
             "statistics, e.g. 0.999 (0: off); last.pth keeps both")
    add("--ohem", type=float, default=0.0, help="keep only this fraction of hardest pixels in the loss (0: off)")
    add("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="random scale augmentation range")
    add("--random-crop", action=argparse.BooleanOptionalAction, default=False,
        help="random instead of centre crop (implied by --scale)")
    add("--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flip")
    add("--jitter", type=float, default=0.0, help="photometric jitter strength (0: off)")
    add("--crop-size", type=int, nargs=2, default=list(cfg.CROP_SIZE), metavar=("H", "W"),
        help="training crop (multiples of 32 keep every pooling exact)")
    add("--val-crop", action="store_true", help="validate on the centre crop instead of the full image")
    add("--downscale", type=float, default=1.0,
        help="shrink train and val images by this factor first (4: quarter resolution, as --recipe camvid-cpu); "
             "test.py and predict.py read it from the checkpoint")
    add("--limit", type=int, help="use only the first K images (by stem) of each split")
    add("--train-splits", default="train",
        help="the splits to train on, e.g. train,val (as the published test scores do); val is validated anyway")
    add("--best", default="auto", choices=("auto", "val", "last"),
        help="what best.pth holds: val, the epoch with the best val MIoU; last, the latest epoch; auto: last when "
             "--train-splits includes val, else val")
    add("--out", type=Path,
        help="run folder (default: weights/<recipe>, else weights/<model>); a new run never writes into a folder "
             "that holds another run")
    add("--resume", action="store_true", help="continue from RUN_DIR/last.pth")
    add("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu or cuda")
    add("--seed", type=int, default=0, help="seed of data order, augmentation and dropout")
    add("--workers", type=int, default=devices.default_workers(),
        help="data loader processes: cores - 2 (the main process and its pin-memory thread keep two), at most 8")
    add("--cache", action=argparse.BooleanOptionalAction, default=False,
        help="decode the splits once into memory")
    add_label_cache_args(parser)
    add("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="mixed precision: bf16 (fp16 on GPUs without bf16) on CUDA, bf16 on CPUs with native bf16; the loss "
             "stays fp32")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="NHWC memory format (faster convolutions on CUDA and in oneDNN on CPUs)")
    add("--fused", action=argparse.BooleanOptionalAction, default=True, help="fused optimizer kernels on CUDA")
    add("--compile", nargs="?", const="inductor", metavar="BACKEND",
        help="torch.compile the training model (alone: the inductor backend)")
    add("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True, help="cuDNN autotuning on CUDA")
    add("--pin-memory", action=argparse.BooleanOptionalAction, default=True,
        help="page-locked batches for asynchronous host-to-GPU copies")
    add("--log-every", type=int, default=10, help="steps between progress updates (host syncs)")
    add("--eval-every", type=int, default=1, help="validate every N epochs (the last epoch always)")
    add("--sync-bn", action="store_true",
        help="SyncBatchNorm under torchrun on CUDA: batch statistics over every process (a host sync per BN layer)")
    add("--tensorboard", action="store_true",
        help="log losses, lr, val metrics and samples per epoch for TensorBoard, in the run folder")
    add("--save-every", type=float, default=300.0, metavar="SECONDS",
        help="write last.pth, best.pth and the plots at most this often (0: every epoch); always at the end "
             "and on a stop signal")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse twice so a --recipe supplies defaults that explicit flags override."""
    parser = get_args_parser()
    options = vars(parser.parse_args([]))
    for name, recipe in RECIPES.items():  # set_defaults would accept a misspelt key and change nothing
        unknown = sorted(set(recipe) - set(options))
        if unknown:
            raise ValueError(f"RECIPES['{name}']: {', '.join(unknown)} is not a train.py option")
    args = parser.parse_args(argv)
    recipe = args.recipe
    if recipe == "auto":
        recipe = machine_recipe(args.device)
        print(f"--recipe auto: {recipe}, {RECIPE_NOTES[recipe]}")
    if recipe:
        parser.set_defaults(**RECIPES[recipe])
        args = parser.parse_args(argv)
        args.recipe = recipe
    return args


def machine_recipe(device: str) -> str:
    """The recipe that suits the --device: the full one on a CUDA GPU, the CPU one elsewhere."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "camvid" if cuda else "camvid-cpu"


def check_args(args: argparse.Namespace) -> None:
    """Bad flags become one clear line."""
    for flag in ("epochs", "batch_size", "accum_steps", "eval_batch_size", "fc_width", "log_every", "step_size",
                 "eval_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit: expected a positive integer, got {args.limit}")
    if args.lr <= 0:
        raise UserError(f"--lr: expected a positive number, got {args.lr}")
    if not 0 <= args.ohem < 1:
        raise UserError(f"--ohem: expected a fraction in [0, 1), got {args.ohem}")
    check_levers(args)
    if args.scale and not 0 < args.scale[0] <= args.scale[1]:
        raise UserError(f"--scale: expected 0 < MIN <= MAX, got {args.scale}")
    if min(args.crop_size) < cfg.MIN_INPUT_SIDE:
        raise UserError(f"--crop-size: expected at least {cfg.MIN_INPUT_SIDE} each side, got {args.crop_size}")
    if args.downscale <= 0:
        raise UserError(f"--downscale: expected a positive factor, got {args.downscale}")
    if args.workers < 0:
        raise UserError(f"--workers: expected >= 0, got {args.workers}")
    if args.time_budget is not None and args.time_budget.strip().lower() == "none":
        args.time_budget = None
    if args.time_budget is not None:
        time_budget.parse_duration(args.time_budget)
        if args.epochs < 2:
            raise UserError(f"--time-budget needs --epochs of at least 2 (the measured epoch and one more), "
                            f"got {args.epochs}")
        if args.schedule == "step":
            raise UserError("--time-budget needs --schedule poly: a step decay cannot anneal to a deadline")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # TensorBoard is an optional install
        except ImportError:
            raise UserError("--tensorboard needs TensorBoard: pip install tensorboard") from None
    if args.save_every < 0:
        raise UserError(f"--save-every: expected seconds >= 0 (0: every epoch), got {args.save_every}")
    check_data_root(args.data_root)


def check_levers(args: argparse.Namespace) -> None:
    """The accuracy options: an EMA decay in [0, 1), deep supervision of a variant with coarser outputs, a
    weight cap >= 0, and well-formed splits (find_split_pairs checks that they exist)."""
    if not 0 <= args.ema < 1:
        raise UserError(f"--ema: expected a decay in [0, 1) such as 0.999 (0: off), got {args.ema}")
    if args.aux_weight < 0:
        raise UserError(f"--aux-weight: expected a weight >= 0, got {args.aux_weight}")
    if args.aux_weight > 0 and args.model == "fcn32s":
        raise UserError("--aux-weight: fcn32s has no coarser output to supervise; use fcn16s or fcn8s")
    if args.class_weight_cap < 0:
        raise UserError(f"--class-weight-cap: expected a weight > 0 (0: uncapped), got {args.class_weight_cap}")
    parse_splits(args.train_splits)


def held_out_line(args: argparse.Namespace) -> str | None:
    """What a run that trains on val says once: its val scores are not held out, and what best.pth holds."""
    if "val" not in parse_splits(args.train_splits):
        return None
    return (f"--train-splits {args.train_splits}: val is trained on, so its scores are not held out (they are still "
            "computed, for the curves); best.pth is " + ("the last epoch" if best_is_last(args)
                                                         else "the best val epoch (--best val)"))


def setup(args: argparse.Namespace) -> Run:
    """Wire data, model, optimiser, schedule and (on --resume) the saved state into one Run."""
    check_args(args)
    args.out = args.out or Path("weights") / (args.recipe or args.model)
    run_folder.check_out(args.out, args.resume)  # on every rank, before any of them writes
    args.class_dict = resolve_class_dict(args.data_root, args.class_dict)
    device = devices.resolve_device(args.device)
    if args.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn: SyncBatchNorm runs on CUDA GPUs only (DDP rejects it on the CPU)")
    dist_info, device = devices.init_distributed(device)
    if dist_info.is_main and held_out_line(args):
        print(held_out_line(args))
    loop = Loop(device, devices.amp_dtype(device, args.amp), args.channels_last, dist_info,
                log_every=args.log_every, clip_grad=args.clip_grad, seed=args.seed, compile=bool(args.compile),
                accum_steps=args.accum_steps, aux_weight=args.aux_weight)
    torch.manual_seed(args.seed)
    table = ClassTable.from_csv(args.class_dict)
    resumed = run_folder.load_resume(args, dist_info.world_size) if args.resume else None
    model = place_model(build_model(args, table, resumed), args, loop)
    if args.ema:  # of the placed model: the average pairs its tensors with the trained ones
        loop.average = WeightAverage(model, args.ema)
    train_loader, val_loader = build_loaders(args, table, loop)
    optimizer = build_optimizer(model, args, device)
    steps_per_epoch = math.ceil(len(train_loader) / args.accum_steps)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=loop.amp == torch.float16)
    loss_fn = build_loss(args, train_loader.dataset, table.num_classes, device)
    folder = run_folder.Folder(args.out, dist_info.is_main, args.save_every)
    run = Run(args, table, model, optimizer, scheduler, scaler, loss_fn, train_loader, val_loader, loop, folder)
    if args.time_budget:
        loop.budget = Budget.start(time_budget.parse_duration(args.time_budget), steps_per_epoch,
                                   args.epochs * steps_per_epoch, args.eval_every, args.save_every,
                                   resumed.get("budget") if resumed is not None else None)
    if resumed is not None:
        restore(run, resumed)
    run.model = wrap_model(model, args, loop)
    return run


def place_model(model: FCN, args: argparse.Namespace, loop: Loop) -> FCN:
    """SyncBatchNorm under torchrun with --sync-bn, then the device and memory format."""
    if args.sync_bn and loop.dist.enabled:
        # Off by default, as in torchvision's references: under NCCL every SyncBatchNorm layer copies a count
        # to the host, a sync per BN layer and forward. Without it each rank normalises with its own batch and
        # rank 0's running statistics are used (DDP's broadcast_buffers, and sync_buffers before validation).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if loop.device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark  # fixed train size: pick the fastest kernels once
    return model.to(loop.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)


def build_loss(args: argparse.Namespace, train_set: CamVidDataset, num_classes: int,
               device: torch.device) -> SegmentationLoss:
    """The training loss, with capped median-frequency class weights when asked for."""
    weight = None
    if args.class_weights == "median-freq":
        args.out.mkdir(parents=True, exist_ok=True)
        cap = args.class_weight_cap or None
        weight = class_weights(train_set, num_classes, cap, args.out / "class_weights.json")
    return SegmentationLoss(weight, args.ohem).to(device)


def wrap_model(model: FCN, args: argparse.Namespace, loop: Loop) -> nn.Module:
    """DDP under torchrun, then torch.compile: compiling the DDP module lets dynamo split the graph at
    DDP's gradient buckets, so the all-reduce still overlaps the backward pass."""
    if loop.dist.enabled:
        model = DistributedDataParallel(model, device_ids=[loop.device.index] if loop.device.type == "cuda" else None,
                                        **buffer_sync(args.sync_bn))
    return torch.compile(model, backend=args.compile) if args.compile else model


def buffer_sync(sync_bn: bool) -> dict:
    """DDP's options for the BatchNorm buffers: SyncBatchNorm keeps every rank's equal, so no broadcast at each
    forward (torch 2.14 names the switch forward_sync_buffers, older versions broadcast_buffers)."""
    if not sync_bn:
        return {}
    names = inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


OPTIMIZER_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how to step, not what was learnt


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load saved optimiser state but keep this run's kernel flags (a CPU checkpoint resumes fused on CUDA,
    a CUDA one unfused on CPU), and store each state tensor in its parameter's memory format: fused
    kernels need matching strides, and --channels-last may differ from the saved run."""
    groups = [{**saved, **{k: current[k] for k in OPTIMIZER_FLAGS if k in current}}
              for saved, current in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for parameter, values in optimizer.state.items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.shape == parameter.shape:
                values[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def restore(run: Run, state: dict) -> None:
    """Load optimiser, schedule, scaler and progress from a checkpoint. A schedule a budget planned, and any
    schedule a budget takes over now, continue from the saved step at the saved rate; a plain run's follows
    this run's --epochs and --warmup-epochs."""
    load_optimizer_state(run.optimizer, state["optimizer"])
    fresh = dict(vars(run.schedule))
    run.scheduler.load_state_dict(state["scheduler"])  # a saved budget.Schedule's fields come back with it
    planned = state.get("budget") is not None and run.schedule.total is not None
    if run.loop.budget is None and not planned:
        vars(run.schedule).update(fresh)
    if state["scaler"]:  # empty when saved by a disabled scaler (CPU, bf16): an fp16 run starts a fresh scale
        run.scaler.load_state_dict(state["scaler"])
    if run.loop.average is not None and state.get("ema"):  # else (--ema added on resume) it starts from here
        run.loop.average.load_state_dict(state["ema"])
    run.start_epoch = state["epoch"] + 1
    run.best_miou, run.history = state["best_miou"], list(state["history"])
    run.done = {key: state["partial_epoch"].get(key, value) for key, value in fresh_progress().items()}
    if not run.loop.dist.is_main:  # the saved partial loss is the sum over every rank: rank 0 carries it
        run.done.update(loss_sum=0.0, count=0)
    run.folder.checkpointed = True


def fit(run: Run) -> None:
    """The epoch loop: train, validate, log, checkpoint, until the schedule's last step (a budget plans it after
    the first epoch and again as the run goes). Whatever ends the run, the folder is complete: a stop signal
    saves and exits cleanly, a divergence keeps the last good checkpoints."""
    run.loop.stop.install()
    run.folder.prepare(run.history)
    if run.loop.dist.is_main:
        print(start_block(run))
        run.loop.pace.tell = lambda seconds: tqdm.write(estimate_line(run, seconds))
        run.board = open_board(run)
    epoch = run.start_epoch
    while not at_end(run.scheduler):
        try:
            if not train_and_validate(run, epoch):
                return stop(run, epoch)
        except TrainingDiverged as error:
            diverged(run, epoch, error)
            raise
        epoch += 1
    finish(run)


def train_and_validate(run: Run, epoch: int) -> bool:
    """One epoch: train (to its end or the planned last step), agree on what comes next, validate when due, log
    and checkpoint; after a budget's measured epoch, plan. False when a stop cut the epoch short."""
    args, loop = run.args, run.loop
    started = time.perf_counter()
    if loop.budget is not None:
        loop.budget.begin_epoch()
    run.train_loader.sampler.set_epoch(epoch, skip=run.done["steps"] * args.batch_size * args.accum_steps)
    finished = train_one_epoch(run.model, run.train_loader, run.optimizer, run.scheduler, run.scaler,
                               run.loss_fn, loop, epoch, run.done)
    trained = time.perf_counter()
    run.done["train_seconds"] += trained - started
    if not finished or not agree_at_epoch_end(run, epoch):
        return False
    final, measuring = at_end(run.scheduler), loop.budget is not None and not loop.budget.planned
    metrics = validate(run) if final or measuring or epoch % args.eval_every == 0 else None
    val_seconds = time.perf_counter() - trained
    if metrics is not None and loop.budget is not None:
        loop.budget.measured(val=val_seconds)
    loop.pace.maybe_tell()  # an epoch shorter than the first few steps
    end_of_epoch(run, epoch, metrics, val_seconds, final)
    if measuring:
        first_plan(run, epoch)
    return True


def agree_at_epoch_end(run: Run, epoch: int) -> bool:
    """The ranks' one decision when an epoch's training ends: the train loss summed over the ranks (history
    holds the mean of all of them), a divergence, a stop, rank 0's plan. False: stop here."""
    loop, step = run.loop, run.scheduler.last_epoch
    total = run.schedule.total
    if loop.budget is not None and loop.dist.is_main:
        total, deadline = loop.budget.at_epoch_end(step, epoch)
        if deadline:
            loop.stop.request("time budget")
    everyone = [loop.stop.requested, run.done["loss_sum"], run.done["count"]]
    (stops, loss_sum, count), (total,) = devices.agree(loop.device, loop.dist, everyone, [end_code(total)])
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(f"loss became NaN/inf in epoch {epoch} by step {run.done['steps']}")
    if loop.stop.agreed(stops > 0):
        return False  # each rank keeps its own sums: stop() adds them up once
    run.done["loss_sum"], run.done["count"] = loss_sum, int(count)
    follow_plan(loop, run.scheduler, step, total)
    return True


def first_plan(run: Run, epoch: int) -> None:
    """After a budget's measured epoch: rank 0 plans the last step, every rank takes it (or the refusal: -1)
    and the plan is said in one line."""
    loop, step, too_small = run.loop, run.scheduler.last_epoch, None
    total = -1
    if loop.dist.is_main:
        try:
            total = loop.budget.first_plan(step)
        except BudgetTooSmall as error:
            too_small = error
    _, (total,) = devices.agree(loop.device, loop.dist, [], [total])
    if total < 0:
        if loop.dist.is_main:
            write_results(run, str(too_small), epoch)
        raise too_small or BudgetTooSmall("--time-budget: too short for a second epoch (rank 0 names the budget)")
    follow_plan(loop, run.scheduler, step, total)
    if loop.dist.is_main:
        print(plan_line(run))


def stop(run: Run, epoch: int) -> None:
    """After an agreed stop (a signal, or a budget whose measured epoch did not fit): save the partial epoch
    and a complete folder (rank 0) and say how to go on; a budget too small for its measured epoch is a
    BudgetTooSmall on every rank."""
    loop, main, steps = run.loop, run.loop.dist.is_main, run.done["steps"]
    (run.done["loss_sum"], run.done["count"]), _ = devices.agree(
        loop.device, loop.dist, [run.done["loss_sum"], run.done["count"]], [])  # the partial epoch of every rank
    batches = f" ({steps * run.args.accum_steps} batches)" if run.args.accum_steps > 1 else ""
    reason = loop.stop.signal_name
    where = f"stopped in epoch {epoch} after step {steps}{batches}"
    if main:
        save(run, epoch - 1)
    if reason == "time budget":  # only before the first plan: after it the deadline moves the plan's end
        budget = loop.budget
        training = budget.clock() - budget.epoch_started
        epoch_seconds = training / max(1, loop.pace.steps) * run.schedule.steps_per_epoch
        smallest = (budget.spent() - training + 2.2 * epoch_seconds) / (1 - time_budget.GUESSED_WRITE - 0.01)
        error = BudgetTooSmall(f"--time-budget {format_duration(budget.seconds)}: the first epoch did not fit "
                               f"({where}); the smallest budget that works here is about {format_duration(smallest)}")
        if main:
            write_results(run, str(error), epoch)
        raise error
    if main:
        write_results(run, f"{reason}: {where}", epoch)
        print(f"{reason}: {where}; saved {run.args.out / 'last.pth'}. Resume with the same command plus --resume.")
        print(end_block(run))


def diverged(run: Run, epoch: int, error: Exception) -> None:
    """NaN/inf loss, agreed by every rank: keep the last good last.pth, write a pending better best.pth, curves,
    samples of the last good weights and results.json (rank 0)."""
    if not run.loop.dist.is_main:
        return
    folder, model = run.folder, unwrap(run.model)
    good = folder.best["model"] if folder.best is not None else None
    folder.write_best()
    if good is None and (run.args.out / "best.pth").is_file():
        good = run_folder.load_checkpoint(run.args.out / "best.pth")["model"]
    try:
        if good is not None:
            model.load_state_dict(good)
    except RuntimeError:  # a best.pth of another model left in the folder: no samples rather than wrong ones
        good = None
    if run.history:
        run_folder.plot_curves(run.history, run.args.out / "curves.png")
    if good is not None:
        run_folder.write_samples(*val_samples(run), run.table, run.args.out / "val_samples.png")
    write_results(run, f"diverged: {error}", epoch)


def finish(run: Run) -> None:
    """results.json of a completed run and what to do next (rank 0)."""
    if not run.loop.dist.is_main:
        return
    if not run.history or run.history[-1]["epoch"] < run.start_epoch:  # nothing was left to train
        print(f"{run.args.out / 'last.pth'} already has {len(run.history)} epochs; raise --epochs to train more")
        return
    write_results(run)
    print(end_block(run))


def write_results(run: Run, stopped: str | None = None, epoch: int | None = None) -> None:
    """results.json: the best validated epoch's metrics, how the run was made, and whether it completed."""
    command = "python train.py " + " ".join(sys.argv[1:])
    results = run_folder.run_results(run.history, run.config(), devices.device_name(run.loop.device), command,
                                     last=run.keep_last)
    splits = parse_splits(run.args.train_splits)
    results.update(completed=stopped is None, precision=devices.precision_name(run.loop.amp),
                   train_splits=list(splits), val_held_out="val" not in splits,
                   best_pth="last epoch" if run.keep_last else "best val epoch", ema=run.args.ema or None)
    if stopped is not None:
        results.update(stop_reason=stopped, stopped_epoch=epoch)
    if run.loop.budget is not None:
        results["time_budget"] = {**run.loop.budget.state(), "epochs": run.schedule.epochs}
    run.folder.write_results(results)


def stop_workers(loader: DataLoader) -> None:
    """Shut persistent workers down now, through the DataLoader's own sentinel path: left to interpreter exit,
    multiprocessing would SIGTERM them, which they ignore (devices.ignore_stop_signals), and wait forever."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


# ---------------------------------------------------------------- what the run says (rank 0)

def start_block(run: Run) -> str:
    """What the run is about to do, in one short block."""
    args, loop, schedule = run.args, run.loop, run.schedule
    model, world = unwrap(run.model), loop.dist.world_size
    width = f", fc width {model.config.fc_width}" if model.config.fc_width else ""
    shrunk = f", shrunk {args.downscale:g}x" if args.downscale != 1 else ""
    per_step = args.batch_size * args.accum_steps * world
    shape = f"{args.batch_size} x {args.accum_steps} batches" if args.accum_steps > 1 else f"batch {args.batch_size}"
    if loop.budget is None:
        plan = f"{schedule.epochs} epochs"
    elif loop.budget.planned:
        plan = f"{schedule.epochs} epochs planned within --time-budget {format_duration(loop.budget.seconds)}"
    else:
        plan = (f"--time-budget {format_duration(loop.budget.seconds)}: as many epochs as fit (at most "
                f"{args.epochs}), planned after epoch {run.start_epoch}")
    resumed = f"; resuming at epoch {run.start_epoch}, step {run.done['steps']}" if args.resume else ""
    return "\n".join([
        f"device   {devices.device_name(loop.device)}, {devices.precision_name(loop.amp)}"
        + (f", {world} processes" if world > 1 else ""),
        f"model    {model.config.variant} on {model.config.backbone}{width}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters",
        f"data     {args.data_root}: {len(run.train_loader.dataset)} train, {len(run.val_loader.dataset)} val "
        f"images{shrunk}, crops {args.crop_size[0]}x{args.crop_size[1]}",
        f"steps    {per_step} images a step ({shape}" + (f" x {world} processes" if world > 1 else "")
        + f"), {schedule.steps_per_epoch} steps an epoch",
        f"plan     {plan}{resumed}",
        f"output   {args.out}"])


def estimate_line(run: Run, per_step: float) -> str:
    """After the first few steps: the pace, and the whole run's wall time at that pace (validation guessed at
    a third of a training step per image) or, before a budget's first plan, the epochs it may fit."""
    schedule, budget, args = run.schedule, run.loop.budget, run.args
    val = per_step * len(run.val_loader.dataset) / (3 * args.batch_size * args.accum_steps * run.loop.dist.world_size)
    epoch = per_step * schedule.steps_per_epoch + val / args.eval_every
    pace = f"pace     {per_step:.2f} s a step, ~{format_duration(epoch)} an epoch"
    if budget is not None and not budget.planned:
        return pace + f": the {format_duration(budget.seconds)} budget fits about {int(budget.left() / epoch)} epochs"
    steps_left = schedule.total - run.scheduler.last_epoch
    whole = time_budget.process_age() + steps_left * epoch / schedule.steps_per_epoch
    return pace + f": the whole run ({schedule.epochs} epochs) takes about {format_duration(whole)}"


def epoch_line(run: Run, epoch: int, row: dict, seconds: float) -> str:
    """One line per epoch: losses, val metrics, its time and the time left for the whole run."""
    val = (f"val_loss {row['val_loss']:.4f} PA {row['val_pa']:.4f} MPA {row['val_mpa']:.4f} "
           f"MIoU {row['val_miou']:.4f}") if row["val_miou"] is not None else "(not validated)"
    budget, schedule = run.loop.budget, run.schedule
    if budget is not None:
        left = f"{format_duration(max(0.0, budget.left()))} of the budget left"
    else:
        left = f"~{format_duration((schedule.epochs - epoch) * seconds)} left"
    return f"{epoch_label(epoch, schedule)}: train_loss {row['train_loss']:.4f} {val} ({seconds:.1f}s; {left})"


def plan_line(run: Run) -> str:
    """A budget's first plan, in one line."""
    budget, schedule = run.loop.budget, run.schedule
    costs = budget.costs
    return (f"time budget {format_duration(budget.seconds)}: {schedule.epochs} epochs ({schedule.total} steps of "
            f"~{costs.step:.3f} s; val {costs.val:.1f} s every {run.args.eval_every}, checkpoint {costs.save:.1f} s; "
            f"{budget.spent():.0f} s spent), warm-up {schedule.warmup_epochs}, planned again after every epoch")


def end_block(run: Run) -> str:
    """How the run ended: best val MIoU and its epoch, wall time, the files and the commands that use them."""
    out, best = run.args.out, run_folder.run_results(run.history, {}, "", "", last=run.keep_last)
    which = "last" if run.keep_last else "best"
    lines = [f"run      {len(run.history)} epochs, {format_duration(time_budget.process_age())} in this process; "
             + (f"{which} val MIoU {best['miou']:.4f} (epoch {best['best_epoch']})" if best["miou"] is not None
                else "not validated yet")]
    if run.loop.budget is not None:
        budget = run.loop.budget
        lines.append(f"budget   {budget.spent():.0f} s of {budget.seconds:.0f} s used "
                     f"({100 * budget.spent() / budget.seconds:.1f} %), the end planned {len(budget.replans)} times")
    lines.append(f"files    {out}/ " + " ".join(name for name in run_folder.RUN_FILES if (out / name).exists()))
    data = f" --data-root {run.args.data_root}" if run.args.data_root != cfg.default_data_root() else ""
    if (out / "best.pth").exists():
        lines += [f"next     python test.py --weights {out / 'best.pth'}{data} --split val",
                  f"         python predict.py --weights {out / 'best.pth'} --input photo.jpg --out masks --overlay"]
    return "\n".join(lines)


def open_board(run: Run):
    """--tensorboard's writer, in the run folder; a resumed run replaces the events of the epochs it redoes."""
    if not run.args.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter  # an optional install, checked by check_args
    return SummaryWriter(str(run.args.out), purge_step=run.start_epoch)


def log_board(run: Run, row: dict, samples: tuple | None) -> None:
    """One epoch in TensorBoard: losses, lr, val metrics with the per-class IoU, the val samples image."""
    board, epoch = run.board, row["epoch"]
    board.add_scalar("train/loss", row["train_loss"], epoch)
    board.add_scalar("train/lr", row["lr"], epoch)
    if row["val_miou"] is not None:
        for key in ("val_loss", "val_pa", "val_mpa", "val_miou"):
            board.add_scalar(f"val/{key[len('val_'):]}", row[key], epoch)
        for name in run.table.names:
            board.add_scalar(f"val_iou/{name}", row[f"iou_{name}"], epoch)
    if samples is not None:
        board.add_image("val/samples", np.asarray(run_folder.sample_grid(*samples, run.table)), epoch,
                        dataformats="HWC")
    board.flush()


def main(args: argparse.Namespace) -> None:
    run = setup(args)
    try:
        fit(run)
    finally:
        for loader in (run.train_loader, run.val_loader):
            stop_workers(loader)
        run.folder.wait()  # a background checkpoint write is on the disk before the process ends
        if run.board is not None:
            run.board.close()
        if run.loop.dist.enabled:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as error:
        cfg.fail(str(error))
    except TrainingDiverged as error:
        cfg.fail(f"{error}; the last good checkpoints are kept (lower --lr or set --clip-grad)", code=1)
