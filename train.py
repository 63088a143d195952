"""Train FCN-32s/16s/8s on CamVid: `python train.py --help`."""
from __future__ import annotations

import argparse
import os
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import cfg
from cfg import UserError
from dataset import (CamVidDataset, ClassTable, SeededSampler, ShardSampler, add_label_cache_args,
                     check_data_root, label_cache_from_args, normalize_batch)
from evalution_segmentaion import ConfusionMatrix
from fcn import BACKBONES, FCN, VARIANTS, FCNConfig, load_vgg_weights
from transforms import eval_transform, train_transform
import utils

# `--recipe camvid`: the defaults chosen for CamVid (issue 4); explicit flags still win.
RECIPES = {
    "camvid": dict(optimizer="sgd", lr=0.01, weight_decay=5e-4, schedule="poly", warmup_epochs=5,
                   epochs=300, batch_size=8, scale=(0.5, 2.0), flip=True, jitter=0.2, clip_grad=10.0),
}


class TrainingDiverged(Exception):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class Loop:
    """What the train/eval loops need to know besides the model and data."""

    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    dist: utils.DistInfo = field(default_factory=utils.DistInfo)
    stop: utils.StopFlag = field(default_factory=utils.StopFlag)
    log_every: int = 10
    clip_grad: float = 0.0
    seed: int = 0


def to_device(images: torch.Tensor, labels: torch.Tensor, loop: Loop) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch -> normalised float images and long labels on the device (copies overlap compute)."""
    images = images.to(loop.device, non_blocking=True)
    labels = labels.to(loop.device, non_blocking=True)
    return normalize_batch(images, loop.channels_last), labels.long()


class SegmentationLoss(nn.Module):
    """Cross-entropy ignoring void, optionally class-weighted and/or with online hard-pixel mining."""

    def __init__(self, weight: torch.Tensor | None = None, ohem_fraction: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ohem_fraction = ohem_fraction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.ohem_fraction <= 0:
            return F.cross_entropy(logits, labels, weight=self.weight, ignore_index=cfg.IGNORE_INDEX)
        losses = F.cross_entropy(logits, labels, weight=self.weight, ignore_index=cfg.IGNORE_INDEX,
                                 reduction="none").flatten()
        # Keep the hardest fraction of pixels; topk with a fixed k needs no host sync. Void pixels
        # have loss 0, so they sort last and are left out of the count.
        k = max(1, int(losses.numel() * self.ohem_fraction))
        labelled = (labels != cfg.IGNORE_INDEX).sum().clamp(min=1, max=k)
        return losses.topk(k).values.sum() / labelled


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, loss_fn: nn.Module, loop: Loop,
                    epoch: int, done: dict) -> bool:
    """One pass over the loader; `done` carries steps/loss_sum/count (also across a resume).
    Returns False when a stop signal cut the epoch short."""
    model.train()
    loss_sum = torch.tensor(done["loss_sum"], device=loop.device, dtype=torch.float64)
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not loop.dist.is_main, dynamic_ncols=True)
    for images, labels in bar:
        images, labels = to_device(images, labels, loop)
        torch.manual_seed(step_seed(loop.seed, loop.dist.rank, epoch, done["steps"]))  # dropout masks
        loss = train_step(model, images, labels, optimizer, scaler, loss_fn, loop)
        scheduler.step()
        loss_sum += loss.double() * len(images)
        done["steps"] += 1
        done["count"] += len(images)
        if done["steps"] % loop.log_every == 0:  # the only host sync of the loop
            check_finite(loss_sum, epoch, done["steps"])
            bar.set_postfix(loss=f"{loss_sum.item() / done['count']:.4f}")
        if loop.stop.agreed(loop.device, loop.dist):
            break
    check_finite(loss_sum, epoch, done["steps"])
    done["loss_sum"] = loss_sum.item()
    return not loop.stop.requested


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loss_fn: nn.Module, loop: Loop) -> torch.Tensor:
    """Forward under autocast, backward through the scaler, optional clipping, step; the detached loss."""
    with utils.autocast(loop.device, loop.amp):
        loss = loss_fn(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if loop.clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), loop.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The global RNG seed (dropout) of one training step. Reseeding every step makes a run resumed at any
    step, mid-epoch included, draw the same masks as an uninterrupted one with no RNG state in last.pth;
    each rank gets its own stream."""
    key = np.random.SeedSequence([seed % 2 ** 64, rank, epoch, step])
    return int(key.generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not math.isfinite(loss_sum.item()):
        raise TrainingDiverged(f"loss became NaN/inf in epoch {epoch} by step {step}")


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, loop: Loop) -> dict:
    """Metrics from one confusion matrix over the whole split, plus the mean per-pixel loss."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, loop.device)
    loss_sum = torch.zeros(2, device=loop.device, dtype=torch.float64)  # summed loss, labelled pixels
    for images, labels in loader:
        images, labels = to_device(images, labels, loop)
        with utils.autocast(loop.device, loop.amp):
            logits = model(images)
        loss_sum[0] += F.cross_entropy(logits.float(), labels, ignore_index=cfg.IGNORE_INDEX, reduction="sum")
        loss_sum[1] += (labels != cfg.IGNORE_INDEX).sum()
        confusion.update(logits.argmax(1), labels)
    confusion.all_reduce()
    if loop.dist.enabled:
        torch.distributed.all_reduce(loss_sum)
    metrics = confusion.compute()
    metrics["loss"] = (loss_sum[0] / loss_sum[1].clamp(min=1)).item()
    return metrics


def median_frequency_weights(dataset: CamVidDataset, num_classes: int, cache: Path | None) -> torch.Tensor:
    """SegNet's median-frequency balancing: weight_c = median(freq) / freq_c, where freq_c is the pixel
    count of c over the pixels of the images that contain c. Cached as JSON beside the run."""
    if cache is not None and cache.is_file():
        return torch.tensor(json.loads(cache.read_text())["weights"])
    pixels, image_pixels = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    for index in range(len(dataset)):
        labels = dataset.load(index)[1].long()
        counts = torch.bincount(labels[labels != cfg.IGNORE_INDEX], minlength=num_classes)[:num_classes].double()
        pixels += counts
        image_pixels += (counts > 0) * labels.numel()
    frequency = pixels / image_pixels.clamp(min=1)
    present = frequency > 0
    weights = torch.where(present, frequency[present].median() / frequency.clamp(min=1e-12), torch.zeros(()))
    if cache is not None:  # atomic: other ranks may read it while rank 0 writes
        utils.atomic_write(cache, lambda tmp: tmp.write_text(json.dumps({"weights": weights.tolist()})))
    return weights.float()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear kernels only: biases and BatchNorm parameters are left alone."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """Adam or SGD(momentum), fused kernels on CUDA."""
    groups = parameter_groups(model, args.weight_decay)
    fused = {"fused": True} if device.type == "cuda" and args.fused else {}
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, **fused)
    return torch.optim.Adam(groups, lr=args.lr, **fused)


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int):
    """Per-step LambdaLR: linear warm-up, then poly (power 0.9) or step decay (×gamma every step-size epochs)."""
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "poly":
            return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** 0.9
        return args.gamma ** (step // (args.step_size * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loaders(args: argparse.Namespace, table: ClassTable, loop: Loop) -> tuple[DataLoader, DataLoader]:
    """Train loader (seeded per-epoch shuffle, sharded across ranks) and val loader (each sample once)."""
    crop = tuple(args.crop_size)
    augment = train_transform(crop, args.scale, args.random_crop, args.flip, args.jitter, args.downscale)
    labels = label_cache_from_args(args)
    train_set = CamVidDataset(args.data_root, "train", table, augment, args.limit, label_cache=labels)
    val_crop = eval_transform(crop if args.val_crop else None, args.downscale)
    val_set = CamVidDataset(args.data_root, "val", table, val_crop, args.limit, label_cache=labels)
    if args.cache:
        train_set.preload()
        val_set.preload()
    common = dict(num_workers=args.workers, pin_memory=args.pin_memory and loop.device.type == "cuda",
                  persistent_workers=args.workers > 0)
    train_sampler = SeededSampler(train_set, loop.dist.world_size, loop.dist.rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, args.batch_size, sampler=train_sampler, **common)
    val_sampler = ShardSampler(len(val_set), loop.dist.world_size, loop.dist.rank)
    val_loader = DataLoader(val_set, args.eval_batch_size, sampler=val_sampler, **common)
    return train_loader, val_loader


def build_model(args: argparse.Namespace, table: ClassTable, resumed: dict | None) -> FCN:
    """A fresh model from the flags (plus --pretrained / --init-from), or the resumed checkpoint's."""
    if resumed is not None:
        return utils.model_from_checkpoint(resumed, table, args.out / "last.pth")
    model = FCN(FCNConfig(args.model, args.backbone, table.num_classes, args.fc_width))
    if args.pretrained:
        load_vgg_weights(model, args.pretrained)
    if args.init_from:
        init_from(model, args.init_from, table)
    return model


def init_from(model: FCN, path: str, table: ClassTable) -> None:
    """The paper's staged training: start from a coarser variant's weights (every layer whose shape fits)."""
    source = utils.model_from_checkpoint(utils.load_checkpoint(path), table, path).state_dict()
    target = model.state_dict()
    shared = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    if not any(k.startswith("features.") for k in shared):
        raise UserError(f"--init-from {path}: no layer matches this model (another backbone?)")
    model.load_state_dict(shared, strict=False)


def run_config(run: dict) -> dict:
    """The resolved configuration: the model's and every training flag (paths as strings)."""
    return {"model": unwrap(run["model"]).config.to_dict(),
            "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run["args"]).items()}}


def checkpoint_state(run: dict, epoch: int) -> dict:
    """Everything --resume needs; `epoch` counts completed epochs, `partial_epoch` the one in progress."""
    model = unwrap(run["model"])
    return {"model": model.state_dict(), "optimizer": run["optimizer"].state_dict(),
            "scheduler": run["scheduler"].state_dict(), "scaler": run["scaler"].state_dict(), "epoch": epoch,
            "best_miou": run["best_miou"], "config": run_config(run), "history": run["history"],
            "partial_epoch": dict(run["done"]), "class_names": list(run["table"].names)}


def history_row(epoch: int, lr: float, train_loss: float, metrics: dict, seconds: float, names) -> dict:
    """One history.csv row: the issue's columns, then the per-class IoU."""
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": metrics["loss"],
           "val_pa": metrics["pixel_accuracy"], "val_mpa": metrics["mean_pixel_accuracy"],
           "val_miou": metrics["miou"], "seconds": round(seconds, 2)}
    row.update({f"iou_{name}": iou for name, iou in zip(names, metrics["iou"])})
    return row


def save_val_samples(model: nn.Module, dataset: CamVidDataset, table: ClassTable, loop: Loop, path: Path) -> None:
    """A few val images with truth and prediction side by side."""
    picks = torch.linspace(0, len(dataset) - 1, min(3, len(dataset))).round().long().unique().tolist()
    images, labels = zip(*(dataset[i] for i in picks))
    images, labels = torch.stack(images), torch.stack(labels)
    model.eval()
    with torch.inference_mode(), utils.autocast(loop.device, loop.amp):
        prediction = model(normalize_batch(images.to(loop.device), loop.channels_last)).argmax(1)
    grid = utils.sample_grid(images, labels, prediction, table)
    utils.atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def fresh_progress() -> dict:
    """Progress through the epoch in progress: kept in last.pth so a resume can finish it."""
    return {"steps": 0, "loss_sum": 0.0, "count": 0, "seconds": 0.0}


def end_of_epoch(run: dict, epoch: int, metrics: dict, seconds: float, loop: Loop) -> None:
    """Log, plot and checkpoint (rank 0 only); best.pth is written too when val MIoU improves."""
    out = run["args"].out
    row = history_row(epoch, run["optimizer"].param_groups[0]["lr"], run["done"]["loss_sum"] / max(1, run["done"]["count"]),
                      metrics, seconds, run["table"].names)
    run["history"].append(row)
    improved = metrics["miou"] > run["best_miou"]
    run["best_miou"] = max(run["best_miou"], metrics["miou"])
    run["done"] = fresh_progress()
    if not loop.dist.is_main:
        return
    print(f"epoch {epoch}: train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
          f"PA {row['val_pa']:.4f} MPA {row['val_mpa']:.4f} MIoU {row['val_miou']:.4f} ({seconds:.1f}s)")
    state = checkpoint_state(run, epoch)
    if improved:  # best.pth first: a kill between the two leaves last.pth one epoch back, so --resume redoes
        # this epoch and writes best.pth again (the other order could lose the best epoch for good)
        utils.save_checkpoint(state, out / "best.pth")
    utils.save_checkpoint(state, out / "last.pth")
    utils.write_history(run["history"], out / "history.csv")
    utils.plot_curves(run["history"], out / "curves.png")
    save_val_samples(unwrap(run["model"]), run["val_loader"].dataset, run["table"], loop, out / "val_samples.png")


def save_run(run: dict, epoch: int) -> None:
    """Write RUN_DIR/last.pth atomically."""
    utils.save_checkpoint(checkpoint_state(run, epoch), run["args"].out / "last.pth")


def sync_buffers(model: nn.Module, dist_info: utils.DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank: without SyncBatchNorm each
    rank's last forward updated its own copy, but validation must score the one model last.pth saves."""
    if dist_info.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def unwrap(model: nn.Module) -> FCN:
    """The FCN inside a DDP and/or torch.compile wrapper."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train FCN on CamVid.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-root", default=cfg.default_data_root(), help="CamVid folder ($CAMVID_ROOT, else data/CamVid)")
    add("--class-dict", default=None, help="class_dict.csv (default: DATA_ROOT/class_dict.csv, else data/class_dict.csv)")
    add("--recipe", choices=sorted(RECIPES), help="set the defaults of a documented recipe; explicit flags still win")
    add("--model", default="fcn8s", choices=VARIANTS)
    add("--backbone", default="vgg16_bn", choices=BACKBONES)
    add("--fc-width", type=int, default=4096, help="fc6/fc7 channels (the paper's 4096; small values for smoke tests)")
    add("--pretrained", nargs="?", const="imagenet", default=None,
        help="ImageNet VGG weights: alone, torchvision's download; with PATH, a torchvision VGG16 state dict")
    add("--init-from", help="start from another run's checkpoint (e.g. the fcn32s best.pth for fcn16s)")
    add("--epochs", type=int, default=100)
    add("--batch-size", type=int, default=8, help="per process")
    add("--eval-batch-size", type=int, default=8)
    add("--optimizer", default="adam", choices=("adam", "sgd"))
    add("--lr", type=float, default=1e-4)
    add("--momentum", type=float, default=0.9)
    add("--weight-decay", type=float, default=0.0)
    add("--schedule", default="step", choices=("step", "poly"))
    add("--step-size", type=int, default=50, help="epochs between step decays")
    add("--gamma", type=float, default=0.5, help="step decay factor")
    add("--warmup-epochs", type=int, default=0)
    add("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    add("--class-weights", default="none", choices=("none", "median-freq"))
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
        help="shrink train and val images by this factor first (2: half resolution, for CPU smoke runs)")
    add("--limit", type=int, help="use only the first K images (by stem) of each split")
    add("--out", type=Path, help="run folder (default weights/<model>)")
    add("--resume", action="store_true", help="continue from RUN_DIR/last.pth")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--seed", type=int, default=0)
    add("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader processes")
    add("--cache", action="store_true", help="decode the splits once into memory")
    add_label_cache_args(parser)
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="NHWC memory format (faster convolutions on CUDA and on this project's CPU bench)")
    add("--fused", action=argparse.BooleanOptionalAction, default=True, help="fused optimizer kernels on CUDA")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True, help="cuDNN autotuning on CUDA")
    add("--pin-memory", action=argparse.BooleanOptionalAction, default=True,
        help="page-locked batches for asynchronous host-to-GPU copies")
    add("--log-every", type=int, default=10, help="steps between progress updates (host syncs)")
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
    if args.recipe:
        parser.set_defaults(**RECIPES[args.recipe])
        args = parser.parse_args(argv)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Bad flags become one clear line."""
    for flag in ("epochs", "batch_size", "eval_batch_size", "fc_width", "log_every", "step_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit: expected a positive integer, got {args.limit}")
    if args.lr <= 0:
        raise UserError(f"--lr: expected a positive number, got {args.lr}")
    if not 0 <= args.ohem < 1:
        raise UserError(f"--ohem: expected a fraction in [0, 1), got {args.ohem}")
    if args.scale and not 0 < args.scale[0] <= args.scale[1]:
        raise UserError(f"--scale: expected 0 < MIN <= MAX, got {args.scale}")
    if min(args.crop_size) < cfg.MIN_INPUT_SIDE:
        raise UserError(f"--crop-size: expected at least {cfg.MIN_INPUT_SIDE} each side, got {args.crop_size}")
    if args.downscale <= 0:
        raise UserError(f"--downscale: expected a positive factor, got {args.downscale}")
    if args.workers < 0:
        raise UserError(f"--workers: expected >= 0, got {args.workers}")
    check_data_root(args.data_root)


def resolve_class_dict(data_root: str, class_dict: str | None) -> Path:
    """--class-dict, else the dataset's own class_dict.csv, else the copy in data/."""
    if class_dict:
        return Path(class_dict)
    own = Path(data_root) / "class_dict.csv"
    return own if own.is_file() else cfg.DEFAULT_CLASS_DICT


def setup(args: argparse.Namespace) -> dict:
    """Wire data, model, optimiser, schedule and (on --resume) the saved state into one run dict."""
    check_args(args)
    args.out = args.out or Path("weights") / args.model
    args.class_dict = resolve_class_dict(args.data_root, args.class_dict)
    device = utils.resolve_device(args.device)
    dist_info, device = utils.init_distributed(device)
    loop = Loop(device, utils.amp_dtype(device, args.amp), args.channels_last, dist_info,
                log_every=args.log_every, clip_grad=args.clip_grad, seed=args.seed)
    torch.manual_seed(args.seed)
    table = ClassTable.from_csv(args.class_dict)
    resumed = utils.load_checkpoint(args.out / "last.pth") if args.resume else None
    model = build_model(args, table, resumed)
    train_loader, val_loader = build_loaders(args, table, loop)
    if dist_info.enabled and model.config.backbone.endswith("_bn") and device.type == "cuda":
        # SyncBatchNorm only on CUDA: DDP rejects it on CPU modules ("SyncBatchNorm layers only work with
        # GPU modules"). With gloo each process normalises with its own batch statistics; the running
        # statistics are broadcast from rank 0 (DDP's broadcast_buffers, and sync_buffers before validation).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, args, device)
    scheduler = build_scheduler(optimizer, args, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=loop.amp == torch.float16)
    run = dict(args=args, table=table, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               train_loader=train_loader, val_loader=val_loader, loop=loop, start_epoch=1, best_miou=-1.0,
               history=[], done=fresh_progress())
    if resumed is not None:
        restore(run, resumed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark  # fixed train size: pick the fastest kernels once
    weight = None
    if args.class_weights == "median-freq":
        args.out.mkdir(parents=True, exist_ok=True)
        weight = median_frequency_weights(train_loader.dataset, table.num_classes, args.out / "class_weights.json")
    run["loss_fn"] = SegmentationLoss(weight, args.ohem).to(device)
    if dist_info.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    run["model"] = torch.compile(model) if args.compile else model
    return run


def restore(run: dict, state: dict) -> None:
    """Load optimiser, schedule, scaler and progress from a checkpoint."""
    run["optimizer"].load_state_dict(state["optimizer"])
    run["scheduler"].load_state_dict(state["scheduler"])
    run["scaler"].load_state_dict(state["scaler"])
    run["start_epoch"] = state["epoch"] + 1
    run["best_miou"], run["history"] = state["best_miou"], list(state["history"])
    run["done"] = dict(state["partial_epoch"])


def fit(run: dict) -> None:
    """The epoch loop: train, validate, log, checkpoint; a stop signal saves and exits cleanly."""
    args, loop = run["args"], run["loop"]
    loop.stop.install()
    if loop.dist.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        if run["history"]:  # a kill between last.pth and history.csv left the csv one epoch behind
            utils.write_history(run["history"], args.out / "history.csv")
        for stale in args.out.glob(".*.tmp*"):  # temporaries of atomic writes cut short by a kill
            stale.unlink(missing_ok=True)
    for epoch in range(run["start_epoch"], args.epochs + 1):
        run["train_loader"].sampler.set_epoch(epoch, skip=run["done"]["steps"] * args.batch_size)
        started = time.perf_counter() - run["done"]["seconds"]
        finished = train_one_epoch(run["model"], run["train_loader"], run["optimizer"], run["scheduler"],
                                   run["scaler"], run["loss_fn"], loop, epoch, run["done"])
        run["done"]["seconds"] = time.perf_counter() - started
        if not finished:
            if loop.dist.is_main:
                save_run(run, epoch - 1)
                print(f"{loop.stop.signal_name}: stopped in epoch {epoch} after step {run['done']['steps']}; "
                      f"saved {args.out / 'last.pth'}. Resume with the same command plus --resume.")
            return
        sync_buffers(unwrap(run["model"]), loop.dist)
        metrics = evaluate(unwrap(run["model"]), run["val_loader"], run["table"].num_classes, loop)
        end_of_epoch(run, epoch, metrics, time.perf_counter() - started, loop)
    if loop.dist.is_main and run["start_epoch"] > args.epochs:
        print(f"{args.out / 'last.pth'} already has {run['start_epoch'] - 1} epochs; raise --epochs to train more")
    elif loop.dist.is_main and run["history"]:
        command = "python train.py " + " ".join(sys.argv[1:])
        results = utils.run_results(run["history"], run_config(run),
                                    utils.device_name(loop.device), command)
        utils.atomic_write(args.out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))


def main(args: argparse.Namespace) -> None:
    run = setup(args)
    try:
        fit(run)
    finally:
        if run["loop"].dist.enabled:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as error:
        utils.fail(str(error))
    except TrainingDiverged as error:
        utils.fail(f"{error}; stopped without saving, the last good checkpoint is intact "
                   "(lower --lr or set --clip-grad)", code=1)
