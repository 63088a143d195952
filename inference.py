"""The one inference path of the project: load a trained model and its class table, run batches (AMP,
channels-last, --scale, TTA), evaluate a split. Used by test.py, predict.py, export.py, bench.py and train.py's
validation, so evaluation and prediction never disagree."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import cfg
import devices
from cfg import UserError
from dataset import ClassTable, normalize_batch
from evalution_segmentaion import ConfusionMatrix
from fcn import FCN, FCNConfig, upgrade_state_dict
from engine.checkpoints import load_checkpoint


class Trained(NamedTuple):
    """A loaded model, the class table it was trained with, the factor its training images were shrunk by
    (train.py --downscale: it saw objects at 1/downscale of their size in CamVid's 360x480 images) and the factor
    it is run at beyond that (train.py --test-scale)."""

    model: nn.Module
    table: ClassTable
    downscale: float
    train_splits: tuple[str, ...] = ("train",)  # the splits it was trained on (train.py --train-splits)
    test_scale: float = 1.0

    def input_scale(self, downscale: float = 1.0, scale: float | None = None) -> float:
        """The factor the model's input is resized by: `scale` when given, else the one that brings images
        shrunk by `downscale` to the scale the model was trained at, times its test scale."""
        return scale if scale is not None else downscale / self.downscale * self.test_scale


def load_model(weights: str | Path, class_dict: str | Path | None, device: torch.device,
               fallback: str | Path = cfg.DEFAULT_CLASS_DICT) -> Trained:
    """A .pth checkpoint or an exported .onnx model (on the device, in eval mode), the class table it was
    trained with (--class-dict only overrides its colours, see trained_table) and its training scale."""
    if Path(weights).suffix.lower() == ".onnx":
        import onnx_backend  # onnxruntime is an optional install (requirements-export.txt)
        model = onnx_backend.load_onnx(weights, None, device)
        table = trained_table(onnx_backend.metadata_table(model.metadata), class_dict, fallback, weights)
        onnx_backend.check_classes(model, table, weights)
        return Trained(model, table, parse_factor(model.metadata.get("downscale", 1.0), weights),
                       test_scale=parse_factor(model.metadata.get("test_scale", 1.0), weights, "test scale"))
    state = load_checkpoint(weights)
    table = trained_table(saved_table(state), class_dict, fallback, weights)
    model = model_from_checkpoint(state, table, weights).to(device).eval()
    splits = saved_flags(state).get("train_splits") or "train"
    return Trained(model, table, trained_downscale(state, weights), tuple(splits.split(",")),
                   trained_test_scale(state, weights))


def saved_flags(state: dict) -> dict:
    """The train.py flags a checkpoint's configuration records (none in checkpoints written before they were)."""
    return state.get("config", {}).get("train", {})


def trained_downscale(state: dict, source: str | Path) -> float:
    """train.py's --downscale saved in a checkpoint's configuration (1 for checkpoints without it), checked."""
    return parse_factor(saved_flags(state).get("downscale") or 1.0, source)


def trained_test_scale(state: dict, source: str | Path) -> float:
    """train.py's --test-scale saved in a checkpoint's configuration (1 for checkpoints without it), checked."""
    return parse_factor(saved_flags(state).get("test_scale") or 1.0, source, "test scale")


def parse_factor(value: object, source: str | Path, what: str = "training downscale") -> float:
    """A saved scale factor as a positive float; anything else is a UserError naming the file."""
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = 0.0
    if not factor > 0:
        raise UserError(f"{source}: {what} {value!r} is not a positive number")
    return factor


def saved_table(state: dict) -> dict | None:
    """The class table a checkpoint (or an ONNX model's metadata) carries; older checkpoints only the names."""
    if "class_table" in state:
        return state["class_table"]
    return {"names": list(state["class_names"])} if state.get("class_names") else None


def trained_table(saved: dict | None, class_dict: str | Path | None, fallback: str | Path, source: str | Path) -> ClassTable:
    """The class table of a trained model: its own (`saved`), or --class-dict, which may only override it with
    the same class names (other colours); `fallback` serves a model that carries no colours."""
    if class_dict is None and saved is not None and "colors" in saved:
        return ClassTable.from_dict(saved)
    table = ClassTable.from_csv(class_dict or fallback)
    if saved is not None and tuple(saved["names"]) != table.names:
        flag = f"--class-dict {class_dict}" if class_dict else f"{fallback} (pass --class-dict)"
        raise UserError(f"{flag}: classes {', '.join(table.names)} differ from the {len(saved['names'])} that "
                        f"{source} was trained on: {', '.join(saved['names'])}")
    return table


def model_from_checkpoint(state: dict, table: ClassTable, source: str | Path) -> FCN:
    """Rebuild the network the checkpoint describes and check it fits the class table."""
    config = FCNConfig(**state["config"]["model"])
    if config.num_classes != table.num_classes:
        raise UserError(f"{source}: checkpoint predicts {config.num_classes} classes but the class table "
                        f"has {table.num_classes}")
    model = FCN(config)
    model.load_state_dict(upgrade_state_dict(state["model"]))
    return model


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: softmax averaged over horizontal flips (optional) and image scales."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @property
    def enabled(self) -> bool:
        return self.flip or self.scales != (1.0,)

    def to_dict(self) -> dict | None:
        return {"flip": self.flip, "scales": list(self.scales)} if self.enabled else None


def parse_tta(text: str | None) -> TTA:
    """'flip', '0.75,1,1.25', 'flip,0.75,1,1.25' or None/'none' -> TTA."""
    if text is None or text == "none":
        return TTA()
    parts = [part.strip() for part in text.split(",") if part.strip()]
    scales = []
    for part in parts:
        if part == "flip":
            continue
        try:
            scales.append(float(part))
        except ValueError:
            raise UserError(f"--tta {text}: expected 'flip' and/or scales, e.g. flip,0.75,1,1.25") from None
        if not 0 < scales[-1] <= 8:
            raise UserError(f"--tta {text}: a scale must be in (0, 8]")
    return TTA("flip" in parts, tuple(scales) or (1.0,))


@dataclass
class Runner:
    """How batches go through the model: device, AMP dtype, memory format, fixed --scale and TTA."""

    model: nn.Module
    device: torch.device
    amp: torch.dtype | None = None
    channels_last: bool = True
    scale: float = 1.0
    tta: TTA = field(default_factory=TTA)

    def __post_init__(self) -> None:
        if getattr(self.model, "is_onnx", False):  # onnxruntime runs its own kernels in its own layout
            self.amp, self.channels_last = None, False
        elif self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if not 0 < self.scale <= 8:
            raise UserError(f"--scale {self.scale}: expected a factor in (0, 8]")

    def fits(self, height: int, width: int) -> bool:
        """Whether an image of this size is at least the model's minimum at every scale it is run at."""
        smallest = min(height, width) * self.scale * min(self.tta.scales)
        return round(smallest) >= cfg.MIN_INPUT_SIDE

    def forward(self, images: torch.Tensor, factor: float) -> torch.Tensor:
        """Normalised N×3×H×W -> float logits at H×W, the model run at factor × the size."""
        return resized(self.view(images, factor), images.shape[-2:])

    def view(self, images: torch.Tensor, factor: float) -> torch.Tensor:
        """Normalised N×3×H×W -> float logits at the size the model ran at, factor × H×W."""
        if factor != 1.0:
            size = images.shape[-2:]
            scaled = [round(side * factor) for side in size]
            if min(scaled) < cfg.MIN_INPUT_SIDE:
                raise UserError(f"--scale/--tta: {size[1]}x{size[0]} scaled by {factor:g} is smaller than "
                                f"{cfg.MIN_INPUT_SIDE}x{cfg.MIN_INPUT_SIDE}")
            images = F.interpolate(images, size=scaled, mode="bilinear", align_corners=False, antialias=factor < 1)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with devices.autocast(self.device, self.amp):
            logits = self.model(images)
        return logits.float()

    @torch.inference_mode()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×3×H×W (any device) -> N×C×H×W class scores on the device: logits without TTA,
        else the mean softmax over the TTA views (argmax of either is the prediction)."""
        images = normalize_batch(images.to(self.device, non_blocking=True))
        if not self.tta.enabled:
            return self.forward(images, self.scale)
        total = None
        for factor in self.tta.scales:
            # Probabilities at the size the model ran at, resized once per scale: resizing every view's logits
            # to the image first cost a softmax over all of its pixels per view, on the CPU more than the forward
            # of a model run at a quarter of the image's size.
            # The mirrored view is a separate forward (not one 2N batch), so a mirrored input takes exactly the
            # same arithmetic path and its prediction is exactly the mirrored prediction.
            probabilities = self.view(images, self.scale * factor).softmax(1)
            if self.tta.flip:
                probabilities += self.view(images.flip(-1), self.scale * factor).softmax(1).flip(-1)
            probabilities = resized(probabilities, images.shape[-2:])
            total = probabilities if total is None else total + probabilities
        return total / (len(self.tta.scales) * (2 if self.tta.flip else 1))

    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×3×H×W -> N×H×W uint8 class indices on the device."""
        return predicted_classes(self.scores(images)).to(torch.uint8)


def predicted_classes(scores: torch.Tensor) -> torch.Tensor:
    """N×C×H×W scores -> N×H×W index of the highest (the first of equal ones, as argmax). Not argmax(1): on the
    CPU it reduced C planes of a contiguous (TTA's) tensor 7x slower than max(1), the largest cost of a TTA pass."""
    return scores.max(1).indices


def resized(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """N×C×h×w scores bilinearly resized to N×C×size (the tensor itself when it has that size)."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)


def sample_predictions(runner: Runner, dataset, count: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to `count` images spread over a dataset, their labels and the runner's predictions (for a picture)."""
    picks = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().long().unique().tolist()
    images, labels = (torch.stack(items) for items in zip(*(dataset[i] for i in picks)))
    runner.model.eval()
    return images, labels, runner.labels(images)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device, amp: torch.dtype | None = None,
             channels_last: bool = True, tta: TTA | None = None, scale: float = 1.0,
             progress: bool = False) -> dict:
    """Metrics from one confusion matrix over the whole split (summed over processes under torchrun), plus
    the mean per-pixel loss, the matrix itself ("confusion", C×C int64, rows = truth) and "pixels"."""
    model.eval()
    runner = Runner(model, device, amp, channels_last, scale, tta or TTA())
    confusion = ConfusionMatrix(num_classes, device)
    loss_sum = torch.zeros(2, device=device, dtype=torch.float64)  # summed loss, labelled pixels
    for images, labels in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True):
        labels = labels.to(device, non_blocking=True).long()
        scores = runner.scores(images)
        if runner.tta.enabled:  # scores are probabilities: the loss of their mean
            loss = F.nll_loss(scores.clamp(min=1e-12).log(), labels, ignore_index=cfg.IGNORE_INDEX, reduction="sum")
        else:
            loss = F.cross_entropy(scores, labels, ignore_index=cfg.IGNORE_INDEX, reduction="sum")
        loss_sum[0] += loss
        loss_sum[1] += (labels != cfg.IGNORE_INDEX).sum()
        confusion.update(predicted_classes(scores), labels)
    confusion.all_reduce()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss_sum)
    metrics = confusion.compute()
    metrics["loss"] = (loss_sum[0] / loss_sum[1].clamp(min=1)).item()
    metrics["confusion"] = confusion.matrix.cpu()
    metrics["pixels"] = int(metrics["confusion"].sum())
    return metrics
