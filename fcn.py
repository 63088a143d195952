"""FCN-32s / 16s / 8s (Long, Shelhamer, Darrell 2015) on a torchvision VGG16 backbone."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

import cfg
from cfg import UserError

VARIANTS = ("fcn32s", "fcn16s", "fcn8s")
BACKBONES = ("vgg16", "vgg16_bn")


@dataclass
class FCNConfig:
    """Everything needed to rebuild the network; saved into every checkpoint."""

    variant: str = "fcn8s"
    backbone: str = "vgg16_bn"
    num_classes: int = 11
    fc_width: int = 4096  # fc6/fc7 channels; the paper's 4096 (tests use a narrow net)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise UserError(f"--model: expected one of {', '.join(VARIANTS)}, got '{self.variant}'")
        if self.backbone not in BACKBONES:
            raise UserError(f"--backbone: expected one of {', '.join(BACKBONES)}, got '{self.backbone}'")

    def to_dict(self) -> dict:
        return asdict(self)


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """ConvTranspose2d weight (in, out, k, k) that upsamples each channel bilinearly, channels unmixed."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(kernel_size, dtype=torch.float64) - center).abs() / factor
    filt = (ramp[:, None] * ramp[None, :]).float()
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size)
    channels = torch.arange(min(in_channels, out_channels))
    weight[channels, channels] = filt
    return weight


def upsampler(channels: int, stride: int) -> nn.ConvTranspose2d:
    """Learnable ×stride upsampling (kernel 2·stride, padding stride/2), initialised to bilinear."""
    layer = nn.ConvTranspose2d(channels, channels, 2 * stride, stride=stride, padding=stride // 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, channels, 2 * stride))
    return layer


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """1×1 scoring layer initialised to zero, as in the paper."""
    layer = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FCN(nn.Module):
    """One parametrised FCN: VGG16 features, convolutionalised fc6/fc7, skips from pool4 (16s) and pool3 (8s)."""

    def __init__(self, config: FCNConfig):
        super().__init__()
        self.config = config
        vgg = getattr(models, config.backbone)(weights=None)
        self.features = vgg.features  # same keys as torchvision: features.N.*
        pools = [i for i, layer in enumerate(self.features) if isinstance(layer, nn.MaxPool2d)]
        self.pool3_index, self.pool4_index = pools[2], pools[3]
        width, classes = config.fc_width, config.num_classes
        self.fc6 = nn.Conv2d(512, width, 7, padding=3)
        self.fc7 = nn.Conv2d(width, width, 1)
        self.drop6, self.drop7 = nn.Dropout2d(0.5), nn.Dropout2d(0.5)
        self.score_fr = zero_conv(width, classes)
        if config.variant == "fcn32s":
            self.upscore = upsampler(classes, 32)
        else:
            self.score_pool4 = zero_conv(512, classes)
            self.upscore2 = upsampler(classes, 2)
        if config.variant == "fcn16s":
            self.upscore = upsampler(classes, 16)
        if config.variant == "fcn8s":
            self.score_pool3 = zero_conv(256, classes)
            self.upscore_pool4 = upsampler(classes, 2)
            self.upscore = upsampler(classes, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×H×W -> N×C×H×W logits for any H, W ≥ 32 (padded to a multiple of 32 inside)."""
        height, width = images.shape[-2:]
        if min(height, width) < cfg.MIN_INPUT_SIDE:
            raise ValueError(f"input {height}x{width} is smaller than {cfg.MIN_INPUT_SIDE}x{cfg.MIN_INPUT_SIDE}")
        # Zero padding of a normalised image is the mean colour; cropped away again below.
        x = F.pad(images, (0, -width % 32, 0, -height % 32))
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index == self.pool3_index:
                pool3 = x
            elif index == self.pool4_index:
                pool4 = x
        x = self.drop6(F.relu(self.fc6(x), inplace=True))
        x = self.drop7(F.relu(self.fc7(x), inplace=True))
        score = self.score_fr(x)
        if self.config.variant != "fcn32s":
            score = self.upscore2(score) + self.score_pool4(pool4)
        if self.config.variant == "fcn8s":
            score = self.upscore_pool4(score) + self.score_pool3(pool3)
        return self.upscore(score)[..., :height, :width]


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG weights (downloaded once into the torch hub cache)."""
    weights = models.get_model_weights(backbone).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise UserError(f"--pretrained: cannot download {weights.url} ({exc}); "
                        "pass --pretrained PATH to a torchvision VGG16 state dict on disk") from exc


def load_vgg_weights(model: FCN, source: str) -> None:
    """Load a torchvision-format VGG16 state dict ('imagenet' or a file) into features, fc6 and fc7."""
    if source == "imagenet":
        state = imagenet_state_dict(model.config.backbone)
    else:
        if not Path(source).is_file():
            raise UserError(f"--pretrained: {source} not found")
        state = torch.load(source, map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    try:
        model.features.load_state_dict(features)
    except RuntimeError as exc:
        raise UserError(f"--pretrained {source}: not a {model.config.backbone} state dict "
                        f"({str(exc).splitlines()[0]})") from exc
    if model.config.fc_width != 4096:
        raise UserError(f"--pretrained needs fc_width 4096, the model has {model.config.fc_width}")
    with torch.no_grad():  # the paper's convolutionalisation: fc weights reshaped into conv kernels
        model.fc6.weight.copy_(state["classifier.0.weight"].view(4096, 512, 7, 7))
        model.fc6.bias.copy_(state["classifier.0.bias"])
        model.fc7.weight.copy_(state["classifier.3.weight"].view(4096, 4096, 1, 1))
        model.fc7.bias.copy_(state["classifier.3.bias"])
