"""FCN-32s / 16s / 8s (Long, Shelhamer, Darrell 2015) on a torchvision classifier: VGG16 as in the paper,
or ResNet and MobileNetV3, whose stride-8/16/32 features are taken by node name (torchvision's feature
extraction) and whose fully connected hidden layers, if any, become convolutions."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models import vgg
from torchvision.models.feature_extraction import create_feature_extractor

import cfg
from cfg import UserError

VARIANTS = ("fcn32s", "fcn16s", "fcn8s")
STRIDES = (8, 16, 32)  # the skips of FCN-8s (pool3, pool4) and the deepest features (pool5)
VGG_LAYERS = {"vgg16": "D", "vgg16_bn": "D"}  # torchvision's configuration of each VGG's convolutional layers


@dataclass(frozen=True)
class Head:
    """A classifier's fully connected hidden layers, convolutionalised (the paper's fc6/fc7): `kernel` is the
    spatial size the first one reads (VGG's 7×7 pool5), `width` their channels, `sources` the Linear layers
    of the torchvision classifier whose ImageNet weights they take."""

    kernel: int
    width: int
    sources: tuple[str, ...]
    activation: type[nn.Module]
    dropout: float


@dataclass(frozen=True)
class Backbone:
    """How FCN reads one torchvision classifier: the nodes whose outputs have stride 8, 16 and 32 (None: the
    3rd-5th max-pools, VGG's pool3-pool5) and its convolutionalised hidden layers (None: it has none, only
    the final classifier layer that the zero-initialised score layer replaces)."""

    taps: tuple[str, str, str] | None
    head: Head | None


VGG_HEAD = Head(7, 4096, ("classifier.0", "classifier.3"), nn.ReLU, 0.5)
RESNET = Backbone(("layer2", "layer3", "layer4"), None)
BACKBONES = {
    "vgg16": Backbone(None, VGG_HEAD),
    "vgg16_bn": Backbone(None, VGG_HEAD),
    "resnet18": RESNET,
    "resnet34": RESNET,
    "resnet50": RESNET,
    # The last block of each stride: features.6 (40 ch), .12 (112 ch), .16 (the 960-ch 1×1 conv)
    "mobilenet_v3_large": Backbone(("features.6", "features.12", "features.16"),
                                   Head(1, 1280, ("classifier.0",), nn.Hardswish, 0.2)),
}


@dataclass
class FCNConfig:
    """Everything needed to rebuild the network; saved into every checkpoint."""

    variant: str = "fcn8s"
    backbone: str = "vgg16_bn"
    num_classes: int = 11
    fc_width: int | None = None  # width of the convolutionalised hidden layers; None: the classifier's own

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise UserError(f"--model: expected one of {', '.join(VARIANTS)}, got '{self.variant}'")
        if self.backbone not in BACKBONES:
            raise UserError(f"--backbone: expected one of {', '.join(BACKBONES)}, got '{self.backbone}'")
        head = BACKBONES[self.backbone].head
        if self.fc_width is not None and head is None:
            raise UserError(f"--fc-width: {self.backbone} has no fully connected hidden layers to narrow "
                            "(its features feed the score layer directly)")
        if self.fc_width is not None and self.fc_width < 1:
            raise UserError(f"--fc-width: expected a positive integer, got {self.fc_width}")

    @property
    def width(self) -> int | None:
        """The hidden layers' width in effect (None when the backbone has none)."""
        head = BACKBONES[self.backbone].head
        return None if head is None else self.fc_width or head.width

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


def classifier(name: str) -> nn.Module:
    """The torchvision classifier, freshly initialised (its own init: Kaiming for ResNets, ...). VGG's fully
    connected head, which FCN drops, lies on the meta device: initialising its 120 M weights took longer than
    building the rest of the model."""
    if name not in VGG_LAYERS:
        return models.get_model(name, weights=None)
    features = vgg.make_layers(vgg.cfgs[VGG_LAYERS[name]], batch_norm=name.endswith("_bn"))
    with torch.device("meta"):  # the head's tensors; VGG's own init still runs on the features built above
        return models.VGG(features)


def tap_nodes(name: str, network: nn.Module) -> tuple[str, str, str]:
    """The node names of the stride-8, -16 and -32 features of a torchvision classifier."""
    taps = BACKBONES[name].taps
    if taps is not None:
        return taps
    pools = [f"features.{child}" for child, layer in network.features.named_children()
             if isinstance(layer, nn.MaxPool2d)]
    return pools[2], pools[3], pools[4]


def drop_head(network: nn.Module, taps: tuple[str, str, str]) -> None:
    """Replace the classifier's children after the last tapped one (its pooling and fully connected head) with
    identities: the features never pass through them, and the traced backbone keeps its source network alive
    in a reference cycle until a garbage collection (MobileNetV3-Large's head is 9.6 MiB, nearly half its weights)."""
    names = [name for name, _ in network.named_children()]
    last = max(names.index(tap.split(".")[0]) for tap in taps)
    for name in names[last + 1:]:
        setattr(network, name, nn.Identity())


class FCN(nn.Module):
    """One parametrised FCN: the backbone's stride-8/16/32 features, its hidden layers as convolutions (VGG's
    fc6/fc7), and skips from stride 16 (FCN-16s) and stride 8 (FCN-8s), as pool4 and pool3 in the paper."""

    def __init__(self, config: FCNConfig):
        super().__init__()
        self.config = config
        network = classifier(config.backbone)
        self.taps = tap_nodes(config.backbone, network)
        drop_head(network, self.taps)
        # Same parameter names as the classifier's, under backbone.: ImageNet weights load by name
        self.backbone = create_feature_extractor(network, {node: str(stride) for node, stride in zip(self.taps, STRIDES)})
        channels = self.tap_channels()
        classes, head, width = config.num_classes, BACKBONES[config.backbone].head, config.width
        if head is not None:
            self.fc6 = nn.Conv2d(channels[32], width, head.kernel, padding=head.kernel // 2)
            self.act6, self.drop6 = head.activation(), nn.Dropout2d(head.dropout)
            if len(head.sources) > 1:
                self.fc7 = nn.Conv2d(width, width, 1)
                self.act7, self.drop7 = head.activation(), nn.Dropout2d(head.dropout)
        self.score_fr = zero_conv(width or channels[32], classes)
        if config.variant == "fcn32s":
            self.upscore = upsampler(classes, 32)
        else:
            self.score_pool4 = zero_conv(channels[16], classes)
            self.upscore2 = upsampler(classes, 2)
        if config.variant == "fcn16s":
            self.upscore = upsampler(classes, 16)
        if config.variant == "fcn8s":
            self.score_pool3 = zero_conv(channels[8], classes)
            self.upscore_pool4 = upsampler(classes, 2)
            self.upscore = upsampler(classes, 8)

    @torch.no_grad()
    def tap_channels(self) -> dict[int, int]:
        """Channels at each stride, from one small probe; a tap at the wrong stride is a bug in BACKBONES."""
        side = 2 * cfg.MIN_INPUT_SIDE
        features = self.backbone.eval()(torch.zeros(1, 3, side, side))
        for stride in STRIDES:
            if features[str(stride)].shape[-1] != side // stride:
                raise ValueError(f"{self.config.backbone}: node {self.taps[STRIDES.index(stride)]} has stride "
                                 f"{side // features[str(stride)].shape[-1]}, not {stride}")
        self.backbone.train()
        return {stride: features[str(stride)].shape[1] for stride in STRIDES}

    def forward(self, images: torch.Tensor, aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """N×3×H×W -> N×C×H×W logits for any H, W ≥ 32 (padded to a multiple of 32 inside). With `aux` (deep
        supervision while training) also the coarser outputs FCN-8s fuses, the stride-32 scores and (FCN-8s)
        the stride-16 fused scores, each upsampled bilinearly to H×W."""
        height, width = images.shape[-2:]
        if min(height, width) < cfg.MIN_INPUT_SIDE:
            raise ValueError(f"input {height}x{width} is smaller than {cfg.MIN_INPUT_SIDE}x{cfg.MIN_INPUT_SIDE}")
        # Zero padding of a normalised image is the mean colour; cropped away again below.
        features = self.backbone(F.pad(images, (0, -width % 32, 0, -height % 32)))
        x = features["32"]
        if hasattr(self, "fc6"):
            x = self.drop6(self.act6(self.fc6(x)))
        if hasattr(self, "fc7"):
            x = self.drop7(self.act7(self.fc7(x)))
        score = self.score_fr(x)
        coarse = []
        if self.config.variant != "fcn32s":
            coarse.append(score)
            score = self.upscore2(score) + self.score_pool4(features["16"])
        if self.config.variant == "fcn8s":
            coarse.append(score)
            score = self.upscore_pool4(score) + self.score_pool3(features["8"])
        logits = crop_to(self.upscore(score), height, width)
        if not aux:
            return logits
        padded = images.shape[-2] + -height % 32, images.shape[-1] + -width % 32
        return logits, [crop_to(F.interpolate(scores, size=padded, mode="bilinear", align_corners=False), height, width)
                        for scores in coarse]


def crop_to(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left height × width of the logits of a padded input. Cropped by negative padding, whose output size
    is height x width as an expression: a slice would make torch.export guard on whether the input needed
    padding, and the ONNX graph keep only that case."""
    return F.pad(logits, (0, width - logits.shape[-1], 0, height - logits.shape[-2]))


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VGG checkpoint written before the backbone was a feature extractor (features.N.* at the top level)
    with today's names (backbone.features.N.*)."""
    return {(f"backbone.{key}" if key.startswith("features.") else key): value for key, value in state.items()}


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of the classifier (through its weights API, cached in the torch hub)."""
    weights = models.get_model_weights(backbone).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise UserError(f"--pretrained: cannot download {weights.url} ({exc}); "
                        f"pass --pretrained PATH to a torchvision {backbone} state dict on disk") from exc


def check_pretrainable(config: FCNConfig) -> None:
    """Refuse, before any download, a model that ImageNet weights cannot fill: narrowed hidden layers."""
    head = BACKBONES[config.backbone].head
    if head is not None and config.width != head.width:
        raise UserError(f"--pretrained: {config.backbone}'s ImageNet hidden layers have {head.width} channels, "
                        f"the model has --fc-width {config.width}; drop --fc-width to use them")


def load_pretrained(model: FCN, source: str) -> None:
    """Load a torchvision classifier's state dict ('imagenet': the weights API's download, or a file) into the
    backbone, and its fully connected hidden layers, reshaped into convolutions, into fc6 (and fc7)."""
    config = model.config
    check_pretrainable(config)
    if source == "imagenet":
        state = imagenet_state_dict(config.backbone)
    else:
        if not Path(source).is_file():
            raise UserError(f"--pretrained: {source} not found")
        state = torch.load(source, map_location="cpu", weights_only=True)
    check_classifier_state(state, config.backbone, source)
    loaded = {key: state[name].reshape(target.shape)  # the paper's convolutionalisation: fc weights as kernels
              for key, target in model.state_dict().items()
              if (name := source_name(config.backbone, key)) is not None}
    model.load_state_dict(loaded, strict=False)


def check_classifier_state(state: object, backbone: str, source: str) -> None:
    """A state dict of exactly this torchvision classifier (every key, no other, the same shapes), else one line."""
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        expected = {key: value.shape for key, value in classifier(backbone).state_dict().items()}
    if not isinstance(state, dict):
        raise UserError(f"--pretrained {source}: not a state dict (a torchvision {backbone}'s state_dict())")
    problems = [f"{key} missing" for key in expected if key not in state]
    problems += [f"unexpected {key}" for key in state if key not in expected]
    problems += [f"{key} has shape {list(state[key].shape)}, expected {list(shape)}" for key, shape in expected.items()
                 if key in state and getattr(state[key], "shape", None) != shape]
    if problems:
        more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise UserError(f"--pretrained {source}: not a {backbone} state dict ({'; '.join(problems[:2])}{more})")


def source_name(backbone: str, key: str) -> str | None:
    """The classifier's name for an FCN parameter or buffer it takes from ImageNet weights (None: FCN's own)."""
    if key.startswith("backbone."):
        return key.removeprefix("backbone.")
    head = BACKBONES[backbone].head
    layer, _, kind = key.partition(".")
    sources = dict(zip(("fc6", "fc7"), head.sources if head else ()))
    return f"{sources[layer]}.{kind}" if layer in sources else None
