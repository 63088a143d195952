"""FCN model: bilinear initialisation, output shapes, pretrained loading."""
import gc
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from conftest import settings_of
from torch import nn
from torchvision import models

import engine.build
import fcn
from cfg import UserError
from engine.build import build_model
from fcn import FCN, FCNConfig, bilinear_kernel, upsampler


def test_bilinear_kernel_values():
    weight = bilinear_kernel(2, 2, 4)
    ramp = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(weight[0, 0], ramp[:, None] * ramp[None, :])
    assert torch.allclose(weight[1, 1], weight[0, 0])
    assert weight[0, 1].abs().sum() == 0 and weight[1, 0].abs().sum() == 0  # channels are not mixed


def test_bilinear_kernel_odd_size_peaks_at_centre():
    weight = bilinear_kernel(1, 1, 3)[0, 0]
    assert weight[1, 1] == 1 and torch.allclose(weight[0], torch.tensor([0.25, 0.5, 0.25]))


@pytest.mark.parametrize("stride", [2, 8, 32])
def test_upsampler_matches_bilinear_interpolation_inside(stride):
    x = torch.randn(1, 3, 5, 6)
    ours = upsampler(3, stride)(x)
    reference = F.interpolate(x, scale_factor=stride, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape
    inner = slice(stride, -stride)  # borders differ: the transposed conv sees zeros beyond the edge
    assert torch.allclose(ours[..., inner, inner], reference[..., inner, inner], atol=1e-5)


@pytest.mark.parametrize("variant", fcn.VARIANTS)
@pytest.mark.parametrize("size", [(32, 32), (45, 77), (97, 33)])
def test_output_has_input_size(variant, size):
    model = FCN(FCNConfig(variant, "vgg16", num_classes=5, fc_width=8)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)


def test_bn_backbone_and_small_input_error():
    model = FCN(FCNConfig("fcn8s", "vgg16_bn", num_classes=3, fc_width=8)).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match="smaller than 32x32"):
        model(torch.randn(1, 3, 31, 64))


def test_skips_change_the_output():
    """fcn8s must use pool3 and pool4: perturbing the score_pool3 layer changes its output."""
    torch.manual_seed(0)
    model = FCN(FCNConfig("fcn8s", "vgg16", num_classes=3, fc_width=8)).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    with torch.no_grad():
        model.score_pool3.bias.fill_(1.0)
    assert not torch.allclose(model(x), before)


def test_bad_variant_is_a_user_error():
    with pytest.raises(UserError, match="--model"):
        FCNConfig(variant="fcn4s")


def test_pretrained_from_path_convolutionalises_fc(tmp_path):
    torch.manual_seed(0)
    vgg = models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    model = FCN(FCNConfig("fcn32s", "vgg16", num_classes=11))
    fcn.load_pretrained(model, str(path))
    assert torch.equal(model.backbone.get_submodule("features.0").weight, vgg.features[0].weight)
    assert torch.equal(model.fc6.weight.flatten(1), vgg.classifier[0].weight)
    assert torch.equal(model.fc7.weight.flatten(1), vgg.classifier[3].weight)
    # The convolutionalised fc6 computes the same as the Linear layer on a 7×7 pool5 map.
    pool5 = torch.randn(1, 512, 7, 7)
    conv = F.conv2d(pool5, model.fc6.weight, model.fc6.bias)  # no padding: one output position
    assert torch.allclose(conv.flatten(), vgg.classifier[0](pool5.flatten(1)).flatten(), atol=1e-4)


def test_pretrained_wrong_backbone_file(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(models.vgg16(weights=None).state_dict(), path)
    model = FCN(FCNConfig("fcn8s", "vgg16_bn", num_classes=11))
    with pytest.raises(UserError, match="not a vgg16_bn state dict"):
        fcn.load_pretrained(model, str(path))


def test_pretrained_narrowed_hidden_layers_are_refused_before_any_download(monkeypatch):
    """train.py --fc-width 1024 --pretrained: refused before the 0.5 GB download, and before building the model."""
    from dataset import ClassTable
    monkeypatch.setattr(fcn, "imagenet_state_dict", lambda name: pytest.fail("downloaded before the check"))
    monkeypatch.setattr(engine.build, "FCN", lambda config: pytest.fail("built before the check"))
    settings = settings_of("--backbone", "vgg16", "--fc-width", "1024", "--pretrained")
    with pytest.raises(UserError, match="--fc-width 1024; drop --fc-width"):
        build_model(settings.model, ClassTable.from_csv(fcn.cfg.DEFAULT_CLASS_DICT), None, settings.run.out)


def test_pretrained_without_network_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(models.VGG16_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    model = FCN(FCNConfig("fcn8s", "vgg16", num_classes=11))
    with pytest.raises(UserError, match="--pretrained: cannot download"):
        fcn.load_pretrained(model, "imagenet")


def test_a_checkpoint_from_before_the_feature_extractor_loads():
    """VGG checkpoints named the features features.N.*; today they live under backbone.features.N.*."""
    model = FCN(FCNConfig("fcn8s", "vgg16", num_classes=3, fc_width=8))
    old = {key.removeprefix("backbone."): value for key, value in model.state_dict().items()}
    assert "features.0.weight" in old
    fresh = FCN(FCNConfig("fcn8s", "vgg16", num_classes=3, fc_width=8))
    fresh.load_state_dict(fcn.upgrade_state_dict(old))
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in model.state_dict().items())


def cyclic_tensor_mib(make) -> float:
    """MiB of tensors that only the cycle collector would free once what make() returns is dropped."""
    gc.collect()
    gc.disable()
    try:
        make()  # dropped at once: only what a reference cycle holds outlives it
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return sum(o.numel() * o.element_size() for o in gc.garbage
                   if isinstance(o, torch.Tensor) and o.device.type != "meta") / 2**20  # meta tensors hold no memory
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_dropped_model_leaves_little_to_the_cycle_collector():
    """The traced backbone is a reference cycle that holds its source classifier: the classifier's fully
    connected head (unused by FCN) must be gone before tracing, or every model built keeps it until a gc pass."""
    assert cyclic_tensor_mib(lambda: FCN(FCNConfig("fcn8s", "vgg16", 11, fc_width=16))) < 100  # its features: 56
    # MobileNetV3-Large: features 11.4 MiB, with its head 21.0
    assert cyclic_tensor_mib(lambda: FCN(FCNConfig("fcn8s", "mobilenet_v3_large", 11))) < 16


def test_vgg_gets_torchvisions_init_but_its_unused_head_is_never_allocated():
    """VGG's fully connected head (120 M weights: initialising them took most of a VGG16 model's build) lies on
    the meta device; the convolutions still get torchvision's VGG init (Kaiming fan-out, zero biases), and the
    state dict has the torchvision classifier's keys and shapes, which --pretrained files are checked against."""
    network = fcn.classifier("vgg16_bn")
    assert {parameter.device.type for parameter in network.classifier.parameters()} == {"meta"}
    with torch.device("meta"):
        reference = models.vgg16_bn(weights=None).state_dict()
    assert {key: value.shape for key, value in network.state_dict().items()} == \
        {key: value.shape for key, value in reference.items()}
    convs = [layer for layer in network.features if isinstance(layer, nn.Conv2d)]
    assert all(layer.weight.device.type == "cpu" and not layer.bias.any() for layer in convs)
    last = convs[-1].weight  # 512x512x3x3: fan-out std sqrt(2 / (512 * 9)) = 0.0208; the default init's is 0.0085
    assert last.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)
