"""Kernel selection before the first measured epoch: cuDNN's autotuning (cudnn.benchmark) and torch.compile choose
their kernels the first time they meet an input shape. A run meets four: the training batch, the epoch's last,
smaller batch, and the same two in validation. Met during epoch 1, they made that epoch many times slower than
the next ones on a GPU, and a time budget planned its run from it."""
from __future__ import annotations

import math

import torch
from torch import nn

import inference
from devices import unwrap
from engine.loss import safe_denominator
from engine.run import Run
from engine.step import backward


def batch_sizes(samples: int, batch: int) -> list[int]:
    """The batch sizes a loader of `samples` makes: the full batch and, if the split does not divide, the last."""
    return sorted({min(batch, samples), samples % batch} - {0}, reverse=True)


def shard(samples: int, world_size: int) -> int:
    """The samples of one rank's shard (DistributedSampler pads the shards to one length)."""
    return math.ceil(samples / world_size)


@torch.no_grad()
def snapshot_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(buffer, buffer.clone()) for buffer in model.buffers()]


def warm_up(run: Run) -> list[tuple[str, tuple[int, ...]]]:
    """One forward and backward of every training batch shape and one forward of every validation batch shape,
    on zero images, before the first epoch when kernels are chosen per shape (CUDA, or --compile). Nothing is
    learnt: no optimizer step, the gradients dropped, BatchNorm's statistics and the random state put back.
    Returns the (kind, shape) pairs it ran."""
    runtime, data = run.runtime, run.settings.data
    if runtime.device.type != "cuda" and not runtime.compile:
        return []
    world = runtime.dist.world_size
    crop = tuple(data.crop_size)
    val_image = run.val_loader.dataset[0][0]
    shapes = [("train", (size, 3, *crop))
              for size in batch_sizes(shard(len(run.train_loader.dataset), world), data.batch_size)]
    shapes += [("val", (size, *val_image.shape))
               for size in batch_sizes(shard(len(run.val_loader.dataset), world), data.eval_batch_size)]
    buffers, rng = snapshot_buffers(unwrap(run.model)), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if runtime.device.type == "cuda" else None
    for kind, shape in shapes:
        if kind == "train":
            train_shape(run, shape)
        else:
            runner = inference.Runner(run.inference_model().eval(), runtime.device, runtime.amp,
                                      runtime.channels_last, data.test_scale)
            runner.scores(torch.zeros(shape, dtype=torch.uint8))
    run.model.train()
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return shapes


def train_shape(run: Run, shape: tuple[int, ...]) -> None:
    """engine.step.backward on one zero batch, without an all-reduce; the gradients dropped."""
    runtime = run.runtime
    images = torch.zeros(shape, device=runtime.device)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.zeros((shape[0], *shape[2:]), dtype=torch.long, device=runtime.device)
    run.model.train()
    backward(run.model, images, labels, run.scaler, run.loss_fn, runtime, safe_denominator(
        run.loss_fn.denominator(labels)), sync=False)
    run.optimizer.zero_grad(set_to_none=True)
