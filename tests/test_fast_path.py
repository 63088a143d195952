"""The fast path (bf16 autocast + channels_last) leaves loss and metrics unchanged; bench.py runs end to end."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402
import cfg  # noqa: E402
import devices  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402
from dataset import ClassTable, normalize_batch  # noqa: E402
from engine.loop import evaluate
from engine.loss import SegmentationLoss
from engine.run import Runtime
from engine.step import to_device, train_step
from fcn import FCN, FCNConfig  # noqa: E402

CPU = torch.device("cpu")
NUM_CLASSES = 11
SIZE = (64, 96)  # H, W of the synthetic images and of the fixture CamVid
REQUIRED_KEYS = {"device", "data_train_img_s", "data_eval_img_s", "train_eager_img_s", "train_fast_img_s",
                 "infer_eager_img_s", "infer_fast_img_s", "infer_fast_latency_ms", "infer_eager_latency_ms",
                 "peak_mem_mb", "flops_per_img", "mfu", "train_size", "train_batch", "infer_size", "infer_batch",
                 "train_speedup", "date", "torch"}
EAGER = Runtime(CPU, None, False)
FAST = Runtime(CPU, torch.bfloat16, True)  # CPU bf16 autocast runs the same code path as CUDA AMP


@pytest.fixture(scope="module")
def model() -> FCN:
    """A narrow random FCN-8s whose zero-initialised score layers are made non-zero, so predictions vary (with
    this seed the model predicts three classes over large areas; random VGG features favour one or two)."""
    torch.manual_seed(5)
    model = FCN(FCNConfig("fcn8s", "vgg16_bn", NUM_CLASSES, fc_width=32))
    with torch.no_grad():
        for layer in (model.score_fr, model.score_pool4, model.score_pool3):
            layer.weight.normal_(0, 0.5)
            layer.bias.normal_(0, 0.5)
    return model.eval()


def synthetic_set(count: int, model: FCN) -> TensorDataset:
    """(3×H×W uint8 image, H×W uint8 labels) pairs: smooth random photos; labels are the fp32 model's
    prediction with 30% of pixels set to a random class and 10% void, so MIoU is far from 0 and 1."""
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand(count, 3, SIZE[0] // 8, SIZE[1] // 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear") * 255
    images = (images + 20 * torch.randn(images.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
    with torch.inference_mode():
        labels = model(normalize_batch(images)).argmax(1).to(torch.uint8)
    noise = torch.rand(labels.shape, generator=generator)
    random_labels = torch.randint(0, NUM_CLASSES, labels.shape, generator=generator, dtype=torch.uint8)
    labels = torch.where(noise < 0.3, random_labels, labels)
    labels[noise > 0.9] = cfg.IGNORE_INDEX
    return TensorDataset(images, labels)


def as_fast(model: FCN) -> FCN:
    """The same weights placed as train.setup places them for the fast path."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def test_fast_path_keeps_evaluation_metrics(model):
    loader = DataLoader(synthetic_set(4, model), batch_size=2)
    eager = evaluate(model, loader, NUM_CLASSES, EAGER)
    fast = evaluate(as_fast(model), loader, NUM_CLASSES, FAST)
    # A telling comparison: several classes predicted and right; mirroring the predictions halves the MIoU.
    assert sum(iou > 0.2 for iou in eager["iou"]) >= 3 and 0.3 < eager["pixel_accuracy"] < 0.95
    assert abs(fast["miou"] - eager["miou"]) < 0.005  # within half a MIoU point
    assert abs(fast["pixel_accuracy"] - eager["pixel_accuracy"]) < 0.005
    assert fast["loss"] == pytest.approx(eager["loss"], rel=0.02)


def test_fast_path_keeps_training_loss_and_head_gradients(model):
    images, labels = synthetic_set(2, model).tensors
    losses, nets = [], []
    for loop, net in ((EAGER, copy.deepcopy(model).train()), (FAST, as_fast(model).train())):
        torch.manual_seed(2)  # the same dropout masks
        x, y = to_device(images, labels, loop)
        assert x.is_contiguous(memory_format=torch.channels_last) == loop.channels_last
        with devices.autocast(loop.device, loop.amp):
            loss = SegmentationLoss()(net(x), y)
        loss.backward()
        losses.append(loss.item())
        nets.append(net)
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    for layer in ("score_fr", "score_pool4", "score_pool3"):
        eager, fast = (getattr(net, layer).weight.grad.flatten() for net in nets)
        assert torch.nn.functional.cosine_similarity(eager, fast, dim=0) > 0.99, layer


def write_camvid(root: Path, counts: dict[str, int]) -> Path:
    """A tiny CamVid layout: split/<stem>.png|jpg and split_labels/<stem>_L.png in class_dict colours."""
    table = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)
    rng = np.random.default_rng(0)
    (root / "class_dict.csv").parent.mkdir(parents=True, exist_ok=True)
    (root / "class_dict.csv").write_text(cfg.DEFAULT_CLASS_DICT.read_text())
    for split, count in counts.items():
        (root / split).mkdir()
        (root / f"{split}_labels").mkdir()
        for index in range(count):
            labels = np.kron(rng.integers(0, table.num_classes, (4, 6)), np.ones((16, 16), np.int64))
            labels[:, :4] = cfg.IGNORE_INDEX
            photo = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
            Image.fromarray(photo).save(root / split / f"{split}{index}.{'png' if index % 2 else 'jpg'}")
            Image.fromarray(table.palette()[labels]).save(root / f"{split}_labels" / f"{split}{index}_L.png")
    return root


def test_bench_quick_writes_json_with_every_key(tmp_path, capsys):
    root = write_camvid(tmp_path / "CamVid", {"train": 4, "val": 3})
    report = tmp_path / "bench.json"
    args = bench.get_args_parser().parse_args(["--quick", "--device", "cpu", "--data-root", str(root),
                                               "--json", str(report), "--backbones", "resnet18,mobilenet_v3_large"])
    with torch.random.fork_rng():
        result = bench.main(args)
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(report.read_text()) == result
    assert list(result["backbones"]) == ["resnet18", "mobilenet_v3_large"]
    for name, row in result["backbones"].items():
        assert row["train_img_s"] > 0 and row["infer_img_s"] > 0 and row["params_m"] > 1, name
        assert any(line.startswith(name) and line.split()[-1] == f"{row['params_m']:.1f}M" for line in printed)
    assert result["backbones"]["mobilenet_v3_large"]["fc_width"] == 1280
    assert result["backbones"]["resnet18"]["fc_width"] is None
    assert REQUIRED_KEYS <= set(result)
    assert result["device"] == "cpu" and result["mfu"] is None and result["quick"] is True
    assert result["train_size"] == result["infer_size"] == [32, 64] and result["train_batch"] == 1
    for key in ("data_train_img_s", "data_eval_img_s", "train_eager_img_s", "train_fast_img_s",
                "infer_eager_img_s", "infer_fast_img_s", "infer_fast_latency_ms", "peak_mem_mb", "flops_per_img"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert any(line.startswith("train step 32x64 batch 1") for line in printed)


@pytest.mark.parametrize("flags, message", [
    (["--train-batch", "0"], "--train-batch: expected a positive integer"),
    (["--backbones", "resnet18,resnet9"], "--backbones: unknown resnet9; expected all, none or some of vgg16,"),
    (["--train-size", "16", "96"], "--train-size: expected at least 32"),
    (["--device", "tpu"], "--device: expected auto, cpu or cuda"),
    (["--data-root", "/nonexistent/CamVid", "--device", "cpu"], "folder not found"),
    (["--data-root", ".", "--device", "cpu", "--json", "/nonexistent/bench.json"], "--json"),
])
def test_bench_bad_values_are_one_line_errors(flags, message):
    with pytest.raises(cfg.UserError, match=message):
        bench.main(bench.get_args_parser().parse_args(flags))


def test_bench_bad_flag_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.get_args_parser().parse_args(["--repeats", "many"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: bench.py: argument --repeats")


bf16_cpu = pytest.mark.skipif(not devices.cpu_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")


@bf16_cpu
def test_amp_on_a_bf16_cpu_runs_training_and_inference_in_bf16_and_the_loss_in_fp32(model, tmp_path, monkeypatch):
    """The default (--amp) on a CPU with bf16 instructions: convolutions in bf16 in train.py's step and in the
    inference path test.py and predict.py take; the loss in fp32. Fails if autocast is silently off."""
    assert devices.amp_dtype(CPU, True) == torch.bfloat16 and devices.amp_dtype(CPU, False) is None
    args = train.parse_args(["--device", "cpu", "--data-root", str(tmp_path)])
    assert devices.amp_dtype(CPU, args.amp) == torch.bfloat16  # what setup() gives the Loop
    seen, trained = [], copy.deepcopy(model).train()  # copied before the hook, which deepcopy would copy too
    hook = model.backbone.get_submodule("features.0").register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    losses = []
    real_total = SegmentationLoss.total
    monkeypatch.setattr(SegmentationLoss, "total",
                        lambda self, logits, labels: losses.append(logits.dtype) or real_total(self, logits, labels))
    trained.backbone.get_submodule("features.0").register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    images, labels = synthetic_batch(2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.01)
    train_step(trained, normalize_batch(images), labels.long(), optimizer, scaler, SegmentationLoss(), FAST)
    inference.Runner(model, CPU, devices.amp_dtype(CPU, True)).labels(images)
    hook.remove()
    assert seen == [torch.bfloat16, torch.bfloat16] and losses == [torch.float32]


def synthetic_batch(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (count, 3, *SIZE), generator=generator, dtype=torch.uint8)
    return images, torch.randint(0, NUM_CLASSES, (count, *SIZE), generator=generator, dtype=torch.uint8)
