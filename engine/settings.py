"""A training run's settings, typed and grouped: what train.py's command line resolves to. Nothing below the
command line reads an argparse Namespace; checkpoints record `flags`, the same settings by flag name."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DataSettings:
    """Which images, how they are augmented, batched and loaded."""

    root: Path
    class_dict: Path
    train_splits: tuple[str, ...] = ("train",)
    limit: int | None = None  # the first K images of each split
    crop_size: tuple[int, int] = (352, 480)
    scale: tuple[float, float] | None = None  # random scale range
    random_crop: bool = False
    flip: bool = False
    jitter: float = 0.0
    val_crop: bool = False
    downscale: float = 1.0
    batch_size: int = 8
    eval_batch_size: int = 8
    workers: int = 0
    cache: bool = False
    pin_memory: bool = True
    label_cache: Path | None = None  # None: every mask decoded and encoded every time
    test_scale: float = 1.0  # the model's input scale in validation, relative to the training images

    @property
    def val_trained_on(self) -> bool:
        return "val" in self.train_splits


@dataclass(frozen=True)
class ModelSettings:
    """The network and how it is placed: variant, backbone, where its first weights come from, wrappers."""

    variant: str = "fcn8s"
    backbone: str = "vgg16_bn"
    fc_width: int | None = None
    pretrained: str | None = None  # "imagenet" or a state dict's path
    init_from: str | None = None
    channels_last: bool = True
    compile: str | None = None  # a torch.compile backend
    sync_bn: bool = False
    cudnn_benchmark: bool = True


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer, the learning-rate schedule and what an optimizer step is."""

    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    backbone_lr_mult: float = 1.0
    schedule: str = "step"
    epochs: int = 100
    step_size: int = 50
    gamma: float = 0.5
    warmup_epochs: int = 0
    clip_grad: float = 0.0
    accum_steps: int = 1
    fused: bool = True


@dataclass(frozen=True)
class LossSettings:
    """The training loss: class balancing, hard-pixel mining, deep supervision."""

    class_weights: str = "none"
    class_weight_cap: float | None = 10.0  # None: uncapped
    class_weight_power: float = 1.0  # 1: SegNet's median-frequency weights; 0.5 their square root
    ohem: float = 0.0
    aux_weight: float = 0.0


@dataclass(frozen=True)
class RunSettings:
    """Where the run goes and how it is driven: folder, device and precision, budget, cadences, reporting."""

    out: Path
    resume: bool = False
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    time_budget: float | None = None  # seconds
    eval_every: int | None = 1  # None: auto, validation kept under 4 % of the run
    save_every: float = 300.0
    log_every: int = 10
    ema: float = 0.0  # 0: off
    best: str = "auto"  # what best.pth holds: val, last, or auto
    tensorboard: bool = False
    recipe: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a training run is made from; `flags` are the same values by flag name (JSON-able), as
    checkpoints and results.json record them, and `command` the command line that made them."""

    data: DataSettings
    model: ModelSettings
    optim: OptimSettings
    loss: LossSettings
    run: RunSettings
    flags: dict = field(default_factory=dict)
    command: str = ""

    @property
    def keep_last(self) -> bool:
        """Whether best.pth is the latest epoch rather than the best validated one (--best, resolved): with
        --best auto, the last epoch when val is trained on (its scores then choose nothing)."""
        return self.run.best == "last" or (self.run.best == "auto" and self.data.val_trained_on)
