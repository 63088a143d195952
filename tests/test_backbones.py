"""FCN on every backbone: the stride-8/16/32 taps, the paper's head, one training step, the scripts end to end."""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from torch import nn
from torchvision import models

import fcn
from cfg import UserError
from fcn import BACKBONES, FCN, STRIDES, FCNConfig, bilinear_kernel

# Channels at stride 8, 16 and 32 as torchvision documents the classifiers: VGG's pool3/pool4/pool5, the
# outputs of ResNet's layer2/3/4, MobileNetV3-Large's last 40-, 112- and 960-channel blocks.
CHANNELS = {"vgg16": (256, 512, 512), "vgg16_bn": (256, 512, 512), "resnet18": (128, 256, 512),
            "resnet34": (128, 256, 512), "resnet50": (512, 1024, 2048), "mobilenet_v3_large": (40, 112, 960)}


def test_every_backbone_is_covered():
    assert set(CHANNELS) == set(BACKBONES)


@functools.cache
def tiny(backbone: str, variant: str = "fcn8s") -> FCN:
    """A 5-class FCN on the backbone, hidden layers narrowed to 8 channels where it has them (built once)."""
    torch.manual_seed(0)
    return FCN(FCNConfig(variant, backbone, 5, 8 if BACKBONES[backbone].head else None))


@pytest.fixture(scope="module", autouse=True)
def models_freed_with_the_module():
    """tiny()'s models (1.4 GB of weights and gradients) go with this file, not with the pytest worker."""
    yield
    tiny.cache_clear()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_taps_have_the_documented_strides_and_channels(backbone):
    features = tiny(backbone).backbone.eval()(torch.zeros(1, 3, 96, 128))
    assert [tuple(features[str(s)].shape[1:]) for s in STRIDES] == [
        (channels, 96 // stride, 128 // stride) for channels, stride in zip(CHANNELS[backbone], STRIDES)]


def successor(node: str) -> str:
    """The next stage of a chain of numbered stages: layer2 -> layer3, features.6 -> features.7."""
    head, number = re.fullmatch(r"(.*?)(\d+)", node).groups()
    return f"{head}{int(number) + 1}"


@pytest.mark.parametrize("backbone", [name for name, spec in BACKBONES.items() if spec.taps is not None])
def test_each_tap_is_the_deepest_stage_at_its_stride(backbone):
    """The FCN skips read a stride's most refined features: the stage after each tap changes the stride."""
    network = models.get_model(backbone, weights=None).eval()
    nodes = dict(network.named_modules())
    for tap, stride in zip(BACKBONES[backbone].taps, STRIDES):
        following = successor(tap)
        if following not in nodes:
            continue
        extractor = models.feature_extraction.create_feature_extractor(network, [tap, following])
        outputs = extractor(torch.zeros(1, 3, 128, 128))
        assert outputs[tap].shape[-1] == 128 // stride and outputs[following].shape[-1] < outputs[tap].shape[-1]


@pytest.mark.parametrize("backbone", ["vgg16", "vgg16_bn"])
def test_vgg_taps_are_the_papers_pool3_to_pool5(backbone):
    model = tiny(backbone)
    network = models.get_model(backbone, weights=None)
    assert all(isinstance(network.get_submodule(tap), nn.MaxPool2d) for tap in model.taps)
    assert model.fc6.kernel_size == (7, 7) and model.fc7.kernel_size == (1, 1)


def test_a_tap_at_the_wrong_stride_is_refused(monkeypatch):
    monkeypatch.setitem(BACKBONES, "resnet18", fcn.Backbone(("layer1", "layer3", "layer4"), None))
    with pytest.raises(ValueError, match="layer1 has stride 4, not 8"):
        FCN(FCNConfig("fcn8s", "resnet18", 5))


@pytest.mark.parametrize("variant", fcn.VARIANTS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_has_the_input_size_for_odd_sizes(backbone, variant):
    with torch.no_grad():
        out = tiny(backbone, variant).eval()(torch.randn(2, 3, 37, 53))
    assert out.shape == (2, 5, 37, 53)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_head_starts_as_the_paper_says(backbone):
    """Score layers at zero, every upsampler exactly the bilinear kernel."""
    model = tiny(backbone)
    for layer in (model.score_fr, model.score_pool4, model.score_pool3):
        assert not layer.weight.any() and not layer.bias.any()
    for layer in (model.upscore2, model.upscore_pool4, model.upscore):
        assert torch.equal(layer.weight, bilinear_kernel(5, 5, layer.kernel_size[0]))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_both_skips_reach_the_output(backbone):
    """Raising one skip's score changes the output where that skip lands: FCN-8s reads strides 8 and 16."""
    model = copy.deepcopy(tiny(backbone)).eval()
    images = torch.randn(1, 3, 64, 64)
    before = model(images)
    for layer in (model.score_pool4, model.score_pool3):
        with torch.no_grad():
            layer.bias[2] += 1.0
        after = model(images)
        assert (after[:, 2] - before[:, 2]).mean() > 0.5
        before = after


@pytest.mark.parametrize("backbone", BACKBONES)
def test_one_training_step_reaches_every_layer(backbone):
    model = copy.deepcopy(tiny(backbone)).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    # Zero score layers pass no gradient back on the first step: only they and the upsamplers get one
    assert all(layer.weight.grad.abs().sum() > 0 for layer in (model.score_fr, model.score_pool4, model.score_pool3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(images), labels).backward()
    first_conv = next(p for name, p in model.named_parameters() if name.startswith("backbone.") and p.ndim == 4)
    assert first_conv.grad.abs().sum() > 0  # the second step reaches the first convolution


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large"])  # VGG16's fc6/fc7: tests/test_model.py
def test_pretrained_hidden_layers_become_convolutions(backbone, tmp_path):
    torch.manual_seed(0)
    network = models.get_model(backbone, weights=None)
    torch.save(network.state_dict(), tmp_path / "classifier.pth")
    model = FCN(FCNConfig("fcn8s", backbone, 5))
    fcn.load_pretrained(model, str(tmp_path / "classifier.pth"))
    features = {key: value for key, value in network.state_dict().items()}
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, features[key]), key
    for conv, linear in zip(("fc6", "fc7"), BACKBONES[backbone].head.sources):
        assert torch.equal(getattr(model, conv).weight.flatten(1), network.get_submodule(linear).weight)


@pytest.mark.parametrize("backbone, other", [("resnet18", "resnet34"), ("resnet50", "resnet18"),
                                             ("mobilenet_v3_large", "resnet18")])
def test_pretrained_state_dict_of_another_backbone_is_one_line(backbone, other, tmp_path):
    path = tmp_path / f"{other}.pth"
    torch.save(models.get_model(other, weights=None).state_dict(), path)
    with pytest.raises(UserError, match=f"{path}: not a {backbone} state dict") as error:
        fcn.load_pretrained(FCN(FCNConfig("fcn8s", backbone, 5)), str(path))
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def trained(camvid, tmp_path_factory):
    """One epoch of train.py on each non-VGG backbone (VGG's runs are the rest of the suite's): run folders."""
    from conftest import SMALL_TRAIN, train_in_process
    folders = {}
    for backbone in [name for name in BACKBONES if not name.startswith("vgg")]:
        out = tmp_path_factory.mktemp(backbone)
        flags = [flag for flag in SMALL_TRAIN if flag not in ("--fc-width", "16")]
        flags[flags.index("--backbone") + 1] = backbone
        train_in_process("--data-root", str(camvid), "--out", str(out), "--epochs", "1", "--limit", "2", *flags)
        folders[backbone] = out
    return folders


# One backbone of each block family goes through export.py (tests/test_export.py exports VGG): ResNet-34 and -50
# are ResNet-18's operators in other numbers, and each dynamo export takes 10-20 s of a 2-core CPU.
EXPORTED = ("resnet18", "mobilenet_v3_large")


@pytest.mark.parametrize("backbone", [name for name in BACKBONES if not name.startswith("vgg")])
def test_best_pth_goes_through_test_predict_and_export(backbone, trained, camvid, tmp_path):
    """The checkpoint records its backbone; test.py scores it, predict.py paints with it, export.py writes an
    ONNX graph that agrees with it (the parity check refuses a file otherwise) for one backbone of each family."""
    import export
    import predict
    import test as test_script
    assert set(EXPORTED) <= set(BACKBONES)
    weights = trained[backbone] / "best.pth"
    assert torch.load(weights, weights_only=True)["config"]["model"]["backbone"] == backbone
    common = ["--weights", str(weights), "--device", "cpu", "--workers", "0"]
    metrics = test_script.main(test_script.get_args_parser().parse_args(
        [*common, "--data-root", str(camvid), "--split", "val"]))
    assert 0 <= metrics["miou"] <= 1 and metrics["pixels"] > 0
    painted = predict.main(predict.get_args_parser().parse_args(
        [*common, "--input", str(camvid / "test"), "--out", str(tmp_path / "masks")]))
    assert painted == 3 and len(list((tmp_path / "masks").iterdir())) == 3
    if backbone not in EXPORTED:
        return
    pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")
    path = export.main(export.get_args_parser().parse_args(
        ["--weights", str(weights), "--data-root", str(camvid), "--out", str(tmp_path / "model.onnx")]))
    assert path.is_file()
