"""The state of a training run: how its loops run (Runtime), how far the epoch under way got (EpochProgress), and
everything the epoch loop works on (Run)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

import devices
from dataset import ClassTable
from devices import unwrap
from engine.budget import Budget
from engine.checkpoints import Folder
from engine.ema import WeightAverage
from engine.schedule import Schedule, schedule_of
from engine.settings import Settings
from fcn import FCN


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
class Runtime:
    """How the training and validation loops run, besides the model and the data: device, precision, processes,
    the stop flag, the step's options, the time budget and the weight average."""

    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    dist: devices.DistInfo = field(default_factory=devices.DistInfo)
    stop_flag: devices.StopFlag = field(default_factory=devices.StopFlag)
    log_every: int = 10
    clip_grad: float = 0.0
    seed: int = 0
    compile: bool = False  # the model is torch.compile'd: mark the batch dimension dynamic
    accum_steps: int = 1  # batches per optimizer step
    budget: Budget | None = None  # --time-budget: rank 0 plans, every rank follows the agreed plan
    pace: Pace = field(default_factory=Pace)
    aux_weight: float = 0.0  # deep supervision: the weight of each coarser output's loss
    average: WeightAverage | None = None  # --ema: updated after every optimizer step


@dataclass
class EpochProgress:
    """How far the epoch under way got: optimizer steps, the summed train loss and the images it covers, training
    seconds. last.pth keeps it ("partial_epoch") so that a resume finishes the epoch."""

    steps: int = 0
    loss_sum: float = 0.0
    count: int = 0
    train_seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "EpochProgress":
        """From last.pth's "partial_epoch" (older checkpoints may lack some fields: they start at 0)."""
        return cls(**{name: saved[name] for name in asdict(cls()) if name in saved})


@dataclass
class EvalCadence:
    """Which epochs are validated: every `every` epochs, the measured and the last one always. With `auto`
    (--eval-every auto) `every` follows the measured costs, so that validation takes at most `share` of the
    run: after each validation, the fewest epochs whose training is 1/share times that validation."""

    every: int = 1
    auto: bool = False
    share: float = 0.04

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0

    def measured(self, train_seconds: float, val_seconds: float) -> bool:
        """Take one epoch's training and one validation's seconds; True when the cadence changed."""
        if not self.auto or train_seconds <= 0:
            return False
        every = max(1, math.ceil(val_seconds / (self.share * train_seconds)))
        changed, self.every = every != self.every, every
        return changed


@dataclass
class Run:
    """What the epoch loop works on: built by engine.build.setup, advanced epoch by epoch, saved in last.pth."""

    settings: Settings
    table: ClassTable
    model: nn.Module  # maybe wrapped in DDP and/or torch.compile: unwrap() gives the FCN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    runtime: Runtime
    folder: Folder
    start_epoch: int = 1
    best_miou: float = -1.0
    history: list[dict] = field(default_factory=list)
    progress: EpochProgress = field(default_factory=EpochProgress)
    cadence: EvalCadence = field(default_factory=EvalCadence)
    board: object | None = None  # --tensorboard's SummaryWriter (rank 0)

    @property
    def schedule(self) -> Schedule:
        return schedule_of(self.scheduler)

    @property
    def is_main(self) -> bool:
        return self.runtime.dist.is_main

    def config(self) -> dict:
        """The configuration checkpoints and results.json record: the model's, every training flag and the
        process count."""
        return {"model": unwrap(self.model).config.to_dict(), "world_size": self.runtime.dist.world_size,
                "train": dict(self.settings.flags)}

    def inference_model(self) -> FCN:
        """The model that is validated and saved as best.pth: the weight average with --ema, else the trained one."""
        return self.runtime.average.model if self.runtime.average is not None else unwrap(self.model)

