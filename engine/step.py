"""One optimizer step: batches to the device, forward under autocast, the loss in fp32, backward through the
gradient scaler (accumulated over --accum-steps batches, all-reduced once under DDP), clipping, the step, and
the weight average's update."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import devices
from dataset import normalize_batch
from devices import wrappers
from engine.loss import safe_denominator
from engine.run import Runtime


def to_device(images: torch.Tensor, labels: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch -> normalised float images and long labels on the device (copies overlap compute)."""
    images = images.to(runtime.device, non_blocking=True)
    labels = labels.to(runtime.device, non_blocking=True)
    return normalize_batch(images, runtime.channels_last), labels.long()


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
                      runtime: Runtime, epoch: int, step: int) -> torch.Tensor:
    """One optimizer step on the gradients of several batches; the detached loss of their union.
    Every batch divides its loss sum by the denominator of the whole group, so batch 2 x 4 steps makes
    the gradient of batch 8 (BatchNorm aside: its statistics stay per batch)."""
    denominator = safe_denominator(sum(loss_fn.denominator(labels) for _, labels in batches))
    optimizer.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=runtime.device)
    for index, (images, labels) in enumerate(batches):
        # Reseeded per batch (dropout masks): a run resumed at any step draws what an uninterrupted one does
        torch.manual_seed(step_seed(runtime.seed, runtime.dist.rank, epoch, step * runtime.accum_steps + index))
        last = index == len(batches) - 1
        loss += backward(model, images, labels, scaler, loss_fn, runtime, denominator, sync=last)
    optimizer_step(model, optimizer, scaler, runtime)
    if runtime.average is not None:
        runtime.average.update()
    return loss


def backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, scaler: torch.amp.GradScaler,
             loss_fn: nn.Module, runtime: Runtime, denominator: torch.Tensor, sync: bool = True) -> torch.Tensor:
    """Forward under autocast and backward through the scaler, adding into .grad; the detached loss share of the
    final output (deep supervision's coarser outputs add to the gradient only). Under DDP only a `sync` backward
    all-reduces (then the gradients accumulated so far as well)."""
    if runtime.compile:  # compile for any batch size at once: the last, smaller batch must not recompile
        torch._dynamo.maybe_mark_dynamic(images, 0)
    with gradient_sync(model, sync):
        with devices.autocast(runtime.device, runtime.amp):
            output = model(images, aux=True) if runtime.aux_weight > 0 else model(images)
        total, loss = loss_fn.supervised(output, labels, runtime.aux_weight)  # in fp32, whatever autocast ran
        scaler.scale(total / denominator).backward()
    return loss.detach() / denominator


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() for a backward that must not all-reduce yet; otherwise nothing."""
    ddp = next((layer for layer in wrappers(model) if isinstance(layer, DistributedDataParallel)), None)
    return ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   runtime: Runtime) -> None:
    """Optional clipping (on unscaled gradients), then the step through the scaler."""
    if runtime.clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), runtime.clip_grad)
    scaler.step(optimizer)
    scaler.update()


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loss_fn: nn.Module, runtime: Runtime) -> torch.Tensor:
    """One batch, one optimizer step (what bench.py times); the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward(model, images, labels, scaler, loss_fn, runtime, safe_denominator(loss_fn.denominator(labels)))
    optimizer_step(model, optimizer, scaler, runtime)
    return loss


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The global RNG seed (dropout) of one training step. Reseeding every step makes a run resumed at any
    step, mid-epoch included, draw the same masks as an uninterrupted one with no RNG state in last.pth;
    each rank gets its own stream."""
    key = np.random.SeedSequence([seed % 2 ** 64, rank, epoch, step])
    return int(key.generate_state(1, np.uint64)[0] >> np.uint64(1))
