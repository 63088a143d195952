"""export.py (ONNX export + parity check) and onnx_backend.py (ONNX Runtime inference)."""
from __future__ import annotations

import copy
import functools
import importlib.abc
import importlib.util
import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")
onnx = pytest.importorskip("onnx", reason="pip install -r requirements-export.txt")
pytest.importorskip("onnxscript", reason="pip install -r requirements-export.txt")

from conftest import run_cli  # noqa: E402

import cfg  # noqa: E402
import export  # noqa: E402
import inference  # noqa: E402
import onnx_backend  # noqa: E402
from cfg import UserError  # noqa: E402
from dataset import ClassTable, normalize_batch  # noqa: E402
from engine.checkpoints import load_checkpoint, save_checkpoint
from fcn import FCN, FCNConfig  # noqa: E402

TABLE = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)
CPU = torch.device("cpu")


@functools.cache
def tiny_model() -> FCN:
    """A narrow FCN-8s whose scoring layers are random (zero-initialised ones predict class 0 everywhere,
    which any broken export would match); built once (VGG16's constructor is slow), never modified."""
    torch.manual_seed(0)
    model = FCN(FCNConfig("fcn8s", "vgg16", TABLE.num_classes, fc_width=16))
    for layer in (model.score_fr, model.score_pool4, model.score_pool3):
        torch.nn.init.normal_(layer.weight, std=0.05)
        torch.nn.init.normal_(layer.bias, std=0.1)
    return model.eval()


def save(model: FCN, path: Path, downscale: float | None = None, test_scale: float | None = None) -> Path:
    """A checkpoint of the model; with `downscale` and `test_scale`, as train.py --downscale/--test-scale write
    them."""
    train = {key: value for key, value in (("downscale", downscale), ("test_scale", test_scale)) if value}
    config = {"model": model.config.to_dict(), **({"train": train} if train else {})}
    save_checkpoint({"model": model.state_dict(), "config": config, "class_names": list(TABLE.names)}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, camvid):
    """One export through the CLI with its defaults (dynamo exporter, parity at 360x480 and 100x150, plus
    the fixture's real images) of a checkpoint trained at --downscale 2 --test-scale 1.5: (checkpoint, onnx file,
    completed process)."""
    weights = save(tiny_model(), tmp_path_factory.mktemp("export") / "best.pth", downscale=2.0, test_scale=1.5)
    result = run_cli("export.py", "--weights", str(weights), "--data-root", str(camvid))
    return weights, weights.with_suffix(".onnx"), result


def agreement(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return (expected.argmax(1) == actual.argmax(1)).double().mean().item()


def test_export_cli_checks_parity_at_real_sizes_and_writes_metadata(exported):
    _, path, result = exported
    lines = [line for line in result.stdout.splitlines() if line.startswith("parity ")]
    assert [line.split(":")[0] for line in lines] == ["parity random 360x480 batch 2", "parity random 100x150 batch 1",
                                                      "parity train_000.png", "parity train_001.jpg"]
    for line in lines:
        assert float(re.search(r"agreement ([\d.]+) %", line).group(1)) >= 99.9
        assert float(re.search(r"difference\| ([\d.e+-]+)", line).group(1)) < 1e-3
    assert f"wrote {path}" in result.stdout and not list(path.parent.glob(".*tmp*"))
    graph = onnx.load(str(path))
    meta = {prop.key: prop.value for prop in graph.metadata_props}
    assert json.loads(meta["class_names"]) == list(TABLE.names)
    assert json.loads(meta["class_colors"]) == TABLE.colors.tolist()
    assert json.loads(meta["mean"]) == list(cfg.IMAGENET_MEAN) and json.loads(meta["std"]) == list(cfg.IMAGENET_STD)
    assert "ImageNet-normalised" in meta["input"] and json.loads(meta["model"])["fc_width"] == 16
    assert (meta["downscale"], meta["test_scale"]) == ("2.0", "1.5")  # the scale predict.py and test.py apply
    dims = [[d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in (graph.graph.input[0], graph.graph.output[0])]
    assert dims == [["batch", 3, "height", "width"], ["batch", TABLE.num_classes, "height", "width"]]
    assert graph.opset_import[0].version == export.OPSET


@pytest.mark.parametrize("shape", [(1, 3, 96, 128), (2, 3, 50, 75)])
def test_onnx_model_matches_pytorch_at_any_size(exported, shape):
    weights, path, _ = exported
    model = inference.model_from_checkpoint(load_checkpoint(weights), TABLE, weights).eval()
    onnx_model = onnx_backend.load_onnx(path, TABLE, CPU)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images = normalize_batch(pixels, channels_last=True)  # as predict.py hands it over
    with torch.inference_mode():
        expected, actual = model(images), onnx_model(images)
    assert actual.shape == (shape[0], TABLE.num_classes, *shape[2:]) and actual.dtype == torch.float32
    assert expected.argmax(1).unique().numel() > 1  # a constant mask would agree with anything
    assert agreement(expected, actual) >= 0.999
    assert torch.allclose(expected, actual, atol=1e-4)
    assert onnx_model.is_onnx and onnx_model.eval() is onnx_model and onnx_model.to(CPU) is onnx_model
    assert onnx_model.num_classes == TABLE.num_classes and onnx_model.providers == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="smaller than 32x32"):
        onnx_model(images[..., :31, :])


def export_perturbed(model: FCN, path: Path, exporter: str, opset: int) -> None:
    """An export whose graph differs from the model it is checked against: one class's score raised."""
    altered = copy.deepcopy(model)
    with torch.no_grad():
        altered.score_fr.bias[3] += 5.0
    REAL_EXPORT(altered, path, exporter, opset)


def export_static(model: FCN, path: Path, exporter: str, opset: int) -> None:
    """A graph traced without dynamic axes: it only accepts the example's 72x100."""
    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(export.EXAMPLE_SHAPE),), str(path), dynamo=False,
                          input_names=[onnx_backend.INPUT], output_names=[onnx_backend.OUTPUT], opset_version=opset)


REAL_EXPORT = export.export_graph


@pytest.mark.parametrize("broken_export, message", [
    (export_perturbed, r"parity check failed: ONNX Runtime's argmax agrees with PyTorch's on [\d.]+ % of pixels, "
                       r"below --min-agreement 99.900 %; nothing written"),
    (export_static, r"parity check failed: ONNX Runtime cannot run random 64x96 batch 2 \(.*INVALID_ARGUMENT.*\); "
                    r"nothing written")])
def test_parity_check_fails_on_a_wrong_graph_and_writes_nothing(tmp_path, monkeypatch, broken_export, message):
    weights = save(tiny_model(), tmp_path / "best.pth")
    out = tmp_path / "fcn8s.onnx"
    out.write_bytes(b"an earlier export")
    monkeypatch.setattr(export, "export_graph", broken_export)
    monkeypatch.setattr(export, "PARITY_SIZES", ((64, 96), (40, 70)))  # small: the verdict, not the size, matters
    args = export.get_args_parser().parse_args(["--weights", str(weights), "--out", str(out), "--exporter",
                                                "torchscript", "--data-root", str(tmp_path / "none")])
    with pytest.raises(UserError, match=message):
        export.main(args)
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "fcn8s.onnx"]  # no temporary left


def test_an_exporter_that_fails_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    weights = save(tiny_model(), tmp_path / "best.pth")

    def failing_export(*args, **kwargs):  # as torch 2.11's exporter failed on named Dims: advice wrapping a cause
        try:
            raise AssertionError("Cannot create Dim with inconsistent min=0, max=-oo")
        except AssertionError as cause:
            raise RuntimeError("Failed to export the model with torch.export.\n- Modify the model code") from cause
    monkeypatch.setattr(torch.onnx, "export", failing_export)
    args = export.get_args_parser().parse_args(["--weights", str(weights), "--data-root", str(tmp_path / "none")])
    with pytest.raises(UserError) as error:
        export.main(args)
    assert str(error.value) == (f"--exporter dynamo: torch {torch.__version__} cannot export this model "
                                "(AssertionError: Cannot create Dim with inconsistent min=0, max=-oo); nothing "
                                "written; try --exporter torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth"]


def test_torchscript_exporter_also_keeps_dynamic_sizes(tmp_path, monkeypatch):
    weights = save(tiny_model(), tmp_path / "best.pth")
    monkeypatch.setattr(export, "PARITY_SIZES", ((64, 96), (40, 70)))
    args = export.get_args_parser().parse_args(["--weights", str(weights), "--exporter", "torchscript",
                                                "--data-root", str(tmp_path / "none")])
    path = export.main(args)
    assert path == tmp_path / "best.onnx"
    images = normalize_batch(torch.randint(0, 256, (1, 3, 100, 150), dtype=torch.uint8))
    with torch.inference_mode():
        assert agreement(tiny_model()(images), onnx_backend.load_onnx(path, TABLE, CPU)(images)) >= 0.999


def test_class_count_mismatch_is_one_clear_error(exported, tmp_path):
    _, path, _ = exported
    csv = tmp_path / "class_dict.csv"
    csv.write_text(cfg.DEFAULT_CLASS_DICT.read_text().rstrip("\n") + "\nExtra,1,2,3\n")
    with pytest.raises(UserError) as error:
        onnx_backend.load_onnx(path, ClassTable.from_csv(csv), CPU)
    assert str(error.value) == f"{path}: ONNX model predicts 11 classes but the class table has 12"


def test_unreadable_foreign_or_missing_onnx_is_a_user_error(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("not a model")
    with pytest.raises(UserError, match=r"garbage.onnx: not a readable ONNX model \("):
        onnx_backend.load_onnx(garbage, TABLE, CPU)
    helper = onnx.helper
    tensor = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [tensor],
                                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])),
              str(foreign))
    with pytest.raises(UserError, match="foreign.onnx: not an ONNX model written by export.py"):
        onnx_backend.load_onnx(foreign, TABLE, CPU)
    with pytest.raises(UserError, match="missing.onnx: ONNX model not found"):
        onnx_backend.load_onnx(tmp_path / "missing.onnx", TABLE, CPU)


def test_missing_onnx_packages_are_one_line_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(UserError) as error:
        onnx_backend.load_onnx("any.onnx", TABLE, CPU)
    assert str(error.value) == "onnxruntime is not installed; install it: pip install -r requirements-export.txt"
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UserError, match="--exporter dynamo needs onnxscript, which is not installed; install it"):
        export.require_export_modules("dynamo")


def test_onnxruntime_is_loaded_with_its_usage_events_off(monkeypatch):
    """onnxruntime sends usage events to Microsoft unless ORT_DISABLE_TELEMETRY=1 is set when it loads (seen through
    a proxy: a request to Microsoft's event collector within 10 s of a session): it is set first, unless the user
    set a value."""
    seen = []

    class Recorder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        """Loads a stand-in onnxruntime, noting the variable at that moment."""
        def find_spec(self, name, path, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "onnxruntime" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            seen.append(os.environ.get("ORT_DISABLE_TELEMETRY"))

    monkeypatch.setattr(sys, "meta_path", [Recorder(), *sys.meta_path])
    for preset in (None, "0"):
        monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
        if preset is None:
            monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
        else:
            monkeypatch.setenv("ORT_DISABLE_TELEMETRY", preset)
        onnx_backend.import_onnxruntime()
    assert seen == ["1", "0"]


def test_export_bad_inputs(tmp_path):
    weights = save(tiny_model(), tmp_path / "best.pth")
    renamed = tmp_path / "class_dict.csv"
    renamed.write_text(cfg.DEFAULT_CLASS_DICT.read_text().replace("Sky", "Heaven"))
    for flags, message in ((["--min-agreement", "1.5"], "--min-agreement: expected a fraction in (0, 1], got 1.5"),
                           (["--out", str(tmp_path / "no" / "x.onnx")], "expected a file name in an existing folder"),
                           (["--out", str(tmp_path)], "expected a file name in an existing folder"),
                           (["--opset", "17"], "--opset 17: the dynamo exporter writes opset 18 or newer"),
                           (["--class-dict", str(renamed)], "best.pth was trained on: Sky, Building")):
        with pytest.raises(UserError, match=re.escape(message)):
            export.main(export.get_args_parser().parse_args(["--weights", str(weights), *flags]))
    result = run_cli("export.py", "--weights", str(tmp_path / "missing.pth"), check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.pth'}: "
                                                                             "checkpoint not found"]


def test_predict_and_test_through_onnx_runtime_equal_pytorch(exported, camvid, tmp_path):
    """Both run at the checkpoint's scale (1.5 x its training scale 1/2): the .onnx file carries it in its
    metadata."""
    import predict
    import test as test_script
    weights, path, _ = exported
    masks = {}
    for name, source in (("pth", weights), ("onnx", path)):  # PyTorch in fp32, as ONNX Runtime runs
        predict.main(predict.get_args_parser().parse_args(
            ["--weights", str(source), "--input", str(camvid / "test"), "--out", str(tmp_path / name), "--device", "cpu",
             "--workers", "0", "--no-amp"]))
        masks[name] = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))])
    assert masks["onnx"].shape == masks["pth"].shape and len(masks["pth"]) == 3
    assert (masks["onnx"] == masks["pth"]).all(-1).mean() >= 0.999
    metrics = {}
    for name, source in (("pth", weights), ("onnx", path)):
        test_script.main(test_script.get_args_parser().parse_args(
            ["--weights", str(source), "--data-root", str(camvid), "--split", "test", "--device", "cpu",
             "--workers", "0", "--no-amp", "--json", str(tmp_path / f"{name}.json")]))
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert abs(metrics["onnx"]["pixel_accuracy"] - metrics["pth"]["pixel_accuracy"]) <= 0.001
    assert metrics["onnx"]["scale"] == metrics["pth"]["scale"] == 0.75


def test_bench_onnx_times_ort_beside_eager_and_fast(capsys):
    import bench
    modes = {"eager": bench.Mode("eager"), "fast": bench.Mode("fast", channels_last=True)}
    result = bench.bench_onnx(bench.PLANS["quick"], modes, CPU, TABLE, "torchscript")
    for key in ("infer_onnx_img_s", "infer_onnx_latency_ms", "onnx_block_eager_img_s", "onnx_block_fast_img_s",
                "onnx_block_eager_latency_ms", "onnx_block_fast_latency_ms"):
        assert result[key] > 0, key
    assert result["onnx_speedup"] == pytest.approx(result["infer_onnx_img_s"] / result["onnx_block_eager_img_s"])
    assert capsys.readouterr().out.startswith("onnx: onnxruntime ")
    assert bench.bench_onnx(bench.PLANS["quick"], modes, torch.device("cuda"), TABLE) == {
        "onnx_skipped": "ONNX Runtime is measured with --device cpu"}
