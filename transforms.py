"""Joint (image, mask) transforms on 3×H×W uint8 images and H×W uint8 masks."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import cfg
from dataset import JointTransform, Sample


def uniform(rng: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    """One float in [low, high) from rng (the global generator when rng is None)."""
    return low + (high - low) * torch.rand((), generator=rng).item()


def pad_to(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> Sample:
    """Pad bottom/right up to size: image with 0, mask with the ignore index."""
    pad_h, pad_w = max(size[0] - mask.shape[0], 0), max(size[1] - mask.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return image, mask
    return (F.pad(image, (0, pad_w, 0, pad_h), value=0),
            F.pad(mask, (0, pad_w, 0, pad_h), value=cfg.IGNORE_INDEX))


class Compose:
    """Apply joint transforms in order with one generator."""

    def __init__(self, steps: Sequence[JointTransform]):
        self.steps = list(steps)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: torch.Generator | None = None) -> Sample:
        for step in self.steps:
            image, mask = step(image, mask, rng)
        return image, mask


class CenterCrop:
    """Deterministic centre crop to (H, W), padding first when the input is smaller."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: torch.Generator | None = None) -> Sample:
        image, mask = pad_to(image, mask, self.size)
        top = (mask.shape[0] - self.size[0]) // 2
        left = (mask.shape[1] - self.size[1]) // 2
        rows, cols = slice(top, top + self.size[0]), slice(left, left + self.size[1])
        return image[:, rows, cols], mask[rows, cols]


class RandomCrop:
    """Random crop to (H, W), padding first (image 0, mask ignore) when the input is smaller."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: torch.Generator | None = None) -> Sample:
        image, mask = pad_to(image, mask, self.size)
        top = int(uniform(rng) * (mask.shape[0] - self.size[0] + 1))
        left = int(uniform(rng) * (mask.shape[1] - self.size[1] + 1))
        rows, cols = slice(top, top + self.size[0]), slice(left, left + self.size[1])
        return image[:, rows, cols], mask[rows, cols]


def resize_pair(image: torch.Tensor, mask: torch.Tensor, factor: float) -> Sample:
    """Resize by factor: image bilinear (antialiased), mask NEAREST so labels never blend."""
    size = [max(1, round(mask.shape[0] * factor)), max(1, round(mask.shape[1] * factor))]
    image = TF.resize(image, size, InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask[None], size, InterpolationMode.NEAREST)[0]
    return image, mask


class Resize:
    """Deterministic resize by a fixed factor (reduced-resolution smoke runs)."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: torch.Generator | None = None) -> Sample:
        return resize_pair(image, mask, self.factor)


class RandomScale:
    """Resize by a factor drawn from [low, high]: image bilinear, mask NEAREST (labels never blend)."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: torch.Generator | None = None) -> Sample:
        return resize_pair(image, mask, uniform(rng, self.low, self.high))


class RandomHorizontalFlip:
    """Mirror image and mask together with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: torch.Generator | None = None) -> Sample:
        if uniform(rng) < self.p:
            return image.flip(-1), mask.flip(-1)
        return image, mask


class ColorJitter:
    """Mild photometric jitter (brightness, contrast, saturation) of the image only."""

    def __init__(self, strength: float):
        self.strength = strength

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: torch.Generator | None = None) -> Sample:
        low, high = 1 - self.strength, 1 + self.strength
        image = TF.adjust_brightness(image, uniform(rng, low, high))
        image = TF.adjust_contrast(image, uniform(rng, low, high))
        image = TF.adjust_saturation(image, uniform(rng, low, high))
        return image, mask


def train_transform(crop: tuple[int, int] = cfg.CROP_SIZE, scale: tuple[float, float] | None = None,
                    random_crop: bool = False, flip: bool = False, jitter: float = 0.0,
                    downscale: float = 1.0) -> Compose:
    """The training pipeline: optional downscale and random scale, crop (centre by default), flip, jitter."""
    steps: list[JointTransform] = [Resize(1 / downscale)] if downscale != 1 else []
    if scale is not None:
        steps.append(RandomScale(*scale))
    steps.append(RandomCrop(crop) if random_crop or scale is not None else CenterCrop(crop))
    if flip:
        steps.append(RandomHorizontalFlip())
    if jitter > 0:
        steps.append(ColorJitter(jitter))
    return Compose(steps)


def eval_transform(crop: tuple[int, int] | None = None, downscale: float = 1.0) -> Compose:
    """Evaluation: full resolution (the benchmark protocol), or the deterministic centre crop."""
    steps: list[JointTransform] = [Resize(1 / downscale)] if downscale != 1 else []
    return Compose(steps + ([CenterCrop(crop)] if crop is not None else []))
