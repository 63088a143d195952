"""inference.py: the one forward path (--scale, TTA), evaluate() over a split, model loading, and
DataLoader-worker errors reaching the user as their own one line."""
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_camvid
from PIL import Image
from torch.utils.data import DataLoader

import cfg
import inference
import test as test_script
from cfg import UserError
from dataset import CamVidDataset, ClassTable, normalize_batch
from engine.checkpoints import save_checkpoint
from fcn import FCN, FCNConfig
from transforms import eval_transform

TABLE = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)


@pytest.fixture(scope="module")
def model() -> FCN:
    """A narrow FCN-8s with random (non-zero) weights, so predictions vary across pixels."""
    torch.manual_seed(0)
    network = FCN(FCNConfig("fcn8s", "vgg16", num_classes=TABLE.num_classes, fc_width=16))
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    return network.eval()


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random.pth"
    save_checkpoint({"model": model.state_dict(), "config": {"model": model.config.to_dict()}}, path)
    return path


def images(seed: int = 0, size=(64, 96), count: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, *size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def runner(model, **kwargs) -> inference.Runner:
    return inference.Runner(model, torch.device("cpu"), channels_last=False, **kwargs)


def test_parse_tta():
    assert inference.parse_tta(None) == inference.TTA() and not inference.TTA().enabled
    assert inference.parse_tta("flip") == inference.TTA(True, (1.0,))
    assert inference.parse_tta("flip,0.75,1,1.25") == inference.TTA(True, (0.75, 1.0, 1.25))
    assert inference.parse_tta("0.5,1").to_dict() == {"flip": False, "scales": [0.5, 1.0]}
    for bad in ("mirror", "flip,0", "flip,-1"):
        with pytest.raises(UserError, match="--tta"):
            inference.parse_tta(bad)


def test_predicted_classes_are_argmax_ties_included_in_either_memory_format():
    scores = torch.randint(0, 3, (2, 5, 7, 9), generator=torch.Generator().manual_seed(0)).float()  # many ties
    for layout in (torch.contiguous_format, torch.channels_last):
        assert torch.equal(inference.predicted_classes(scores.contiguous(memory_format=layout)), scores.argmax(1))


def test_flip_tta_prediction_of_a_mirrored_image_is_the_mirrored_prediction(model):
    batch = images(1)
    flip = runner(model, tta=inference.TTA(flip=True))
    assert torch.equal(flip.labels(batch.flip(-1)), flip.labels(batch).flip(-1))
    assert not torch.equal(runner(model).labels(batch.flip(-1)), runner(model).labels(batch).flip(-1))


def test_scale_one_is_the_plain_forward_and_other_scales_keep_the_size(model):
    batch = images(2)
    with torch.inference_mode():
        plain = model(normalize_batch(batch))
    assert torch.equal(runner(model, scale=1.0).scores(batch), plain)
    for factor in (0.5, 1.5):
        assert runner(model, scale=factor).scores(batch).shape == plain.shape
    assert runner(model, scale=0.5).fits(64, 96) and not runner(model, scale=0.25).fits(64, 96)
    with pytest.raises(UserError, match="smaller than 32x32"):
        runner(model, scale=0.25).scores(batch)


def test_multi_scale_tta_is_the_mean_softmax_of_the_views_each_resized_to_the_image(model):
    """Each view's softmax is taken at the size the model ran at, then resized (one resize per scale)."""
    batch = images(3)
    mean = runner(model, tta=inference.TTA(False, (0.5, 1.0))).scores(batch)
    normalised = normalize_batch(batch)
    with torch.inference_mode():
        half = model(F.interpolate(normalised, size=(32, 48), mode="bilinear", antialias=True)).softmax(1)
        full = model(normalised).softmax(1)
    torch.testing.assert_close(mean, (F.interpolate(half, size=(64, 96), mode="bilinear") + full) / 2)


def test_evaluate_counts_every_labelled_pixel_once_whatever_the_batch(model, tmp_path):
    root = write_camvid(tmp_path / "CamVid", {"val": 3}, seed=4)
    dataset = CamVidDataset(root, "val", TABLE, eval_transform(None))
    one = inference.evaluate(model, DataLoader(dataset, 1), TABLE.num_classes, torch.device("cpu"))
    three = inference.evaluate(model, DataLoader(dataset, 3, num_workers=2), TABLE.num_classes, torch.device("cpu"),
                               tta=inference.TTA())
    assert torch.equal(one["confusion"], three["confusion"]) and one["miou"] == three["miou"]
    labels = torch.stack([dataset[i][1] for i in range(3)])
    assert one["pixels"] == int((labels != cfg.IGNORE_INDEX).sum()) == int(one["confusion"].sum())
    predicted = runner(model).labels(torch.stack([dataset[i][0] for i in range(3)]))
    assert torch.equal(one["confusion"].diag().sum(), ((predicted == labels) & (labels != cfg.IGNORE_INDEX)).sum())
    assert {"pixel_accuracy", "mean_pixel_accuracy", "miou", "fwiou", "iou", "class_accuracy", "loss"} <= set(one)


def test_test_py_json_records_the_tta(weights, tmp_path):
    root = write_camvid(tmp_path / "CamVid", {"test": 1}, seed=6)
    args = test_script.get_args_parser().parse_args(
        ["--data-root", str(root), "--weights", str(weights), "--workers", "0", "--tta", "flip",
         "--json", str(tmp_path / "m.json"), "--device", "cpu"])
    metrics = test_script.main(args)
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["tta"] == {"flip": True, "scales": [1.0]} and result["miou"] == metrics["miou"]
    assert result["label_size"] == [64, 96] and result["scale"] == 1.0  # no training scale saved: 1


def test_load_model_dispatches_onnx_files_to_onnx_backend(weights, monkeypatch):
    calls, graph = [], types.SimpleNamespace(metadata={}, num_classes=TABLE.num_classes)
    fake = types.SimpleNamespace(load_onnx=lambda *args: calls.append(args) or graph,
                                 metadata_table=lambda metadata: None, check_classes=lambda *args: None)
    monkeypatch.setitem(sys.modules, "onnx_backend", fake)
    model, table, downscale, _, test_scale = inference.load_model("model.onnx", None, torch.device("cpu"))
    assert model is graph and table.names == TABLE.names  # no class table in the metadata: data/class_dict.csv
    assert calls == [("model.onnx", None, torch.device("cpu"))] and downscale == test_scale == 1.0
    # what export.py writes for a --downscale 4 --test-scale 1.25 checkpoint
    graph.metadata.update(downscale="4.0", test_scale="1.25")
    loaded = inference.load_model("model.onnx", None, torch.device("cpu"))
    assert (loaded.downscale, loaded.test_scale, loaded.input_scale()) == (4.0, 1.25, 0.3125)
    loaded, table, *_ = inference.load_model(weights, None, torch.device("cpu"))
    assert isinstance(loaded, FCN) and not loaded.training and table.names == TABLE.names


class FakeOnnx:
    """Stands in for onnx_backend.OnnxModel: records what it is fed, returns zero logits."""

    is_onnx, num_classes = True, TABLE.num_classes

    def __init__(self):
        self.inputs = []

    def eval(self):
        return self

    def __call__(self, images):
        self.inputs.append((images, torch.is_autocast_enabled("cpu")))
        return torch.zeros(len(images), self.num_classes, *images.shape[-2:])


def test_onnx_models_get_plain_float32_nchw_without_autocast():
    fake = FakeOnnx()
    onnx_runner = inference.Runner(fake, torch.device("cpu"), amp=torch.bfloat16, channels_last=True)
    assert onnx_runner.labels(images(7, count=1)).shape == (1, 64, 96)
    fed, autocast = fake.inputs[0]
    assert fed.dtype == torch.float32 and fed.is_contiguous() and not autocast
    torch.testing.assert_close(fed, normalize_batch(images(7, count=1)))


def test_user_error_from_a_dataloader_worker_keeps_its_own_message():
    wrapped = ("Caught UserError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise UserError("a: b")\ncfg.UserError: m_L.png: colour (7, 7, 7)\n')
    assert str(UserError(wrapped)) == "m_L.png: colour (7, 7, 7)"
    assert str(UserError("Caught nothing: plain")) == "Caught nothing: plain"


def test_worker_error_in_test_py_is_the_same_line_as_without_workers(weights, tmp_path):
    root = write_camvid(tmp_path / "CamVid", {"test": 2}, seed=5)
    mask_path = root / "test_labels" / "test_001_L.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[:2, :2] = (7, 7, 7)
    Image.fromarray(mask).save(mask_path)
    messages = []
    for workers in ("0", "2"):
        args = test_script.get_args_parser().parse_args(
            ["--data-root", str(root), "--weights", str(weights), "--workers", workers, "--batch-size", "2",
             "--no-label-cache", "--device", "cpu"])
        with pytest.raises(UserError) as error:
            test_script.main(args)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert messages[0] == f"{mask_path}: colour (7, 7, 7) on 4 pixels not in class_dict.csv"


@pytest.fixture(scope="module")
def quarter_scale_run(tmp_path_factory):
    """A CamVid-sized (360x480) fixture and a run trained on it at --downscale 4, as --recipe camvid-cpu does:
    (data root, run folder)."""
    from conftest import SMALL_TRAIN, train_in_process
    root = write_camvid(tmp_path_factory.mktemp("camvid360") / "CamVid", {"train": 2, "val": 1, "test": 2},
                        size=cfg.EVAL_SIZE)
    out = tmp_path_factory.mktemp("quarter")
    train_in_process("--data-root", str(root), "--out", str(out), *SMALL_TRAIN, "--epochs", "1", "--downscale", "4")
    return root, out


def recording_model_inputs(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes every model that inference.load_model loads from now on is called with."""
    shapes, load = [], inference.load_model

    def load_and_record(*args, **kwargs):
        trained = load(*args, **kwargs)
        trained.model.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
        return trained
    monkeypatch.setattr(inference, "load_model", load_and_record)
    return shapes


@pytest.mark.parametrize("flags, label_size, scale", [([], [360, 480], 0.25), (["--downscale", "4"], [90, 120], 1.0)],
                         ids=["benchmark-labels", "downscale-4"])
def test_test_py_runs_the_model_at_its_training_scale_on_the_labels_asked_for(quarter_scale_run, tmp_path, capsys,
                                                                              monkeypatch, flags, label_size, scale):
    root, run = quarter_scale_run
    shapes = recording_model_inputs(monkeypatch)
    test_script.main(test_script.get_args_parser().parse_args(
        ["--data-root", str(root), "--weights", str(run / "best.pth"), "--workers", "0", "--device", "cpu",
         "--json", str(tmp_path / "m.json"), *flags]))
    result = json.loads((tmp_path / "m.json").read_text())
    assert shapes == [(2, 3, 90, 120)]  # the scale it was trained at, whatever the labels
    assert result["label_size"] == label_size and result["scale"] == scale
    assert result["pixels"] == int((np.array(result["confusion"])).sum()) > 0
    height, width = label_size
    assert f"test: 2 images, scored on {height}x{width} labels; model input {scale:g}x (90x120, " \
           in capsys.readouterr().out


def test_scale_overrides_the_training_scale_and_predict_uses_it_too(quarter_scale_run, tmp_path, monkeypatch):
    root, run = quarter_scale_run
    shapes = recording_model_inputs(monkeypatch)
    test_script.main(test_script.get_args_parser().parse_args(
        ["--data-root", str(root), "--weights", str(run / "best.pth"), "--workers", "0", "--device", "cpu",
         "--scale", "0.5", "--limit", "1", "--json", str(tmp_path / "m.json")]))
    assert shapes.pop() == (1, 3, 180, 240) and json.loads((tmp_path / "m.json").read_text())["scale"] == 0.5
    import predict
    image = root / "test" / "test_000.png"
    for flags, shape in (([], (1, 3, 90, 120)), (["--scale", "0.5"], (1, 3, 180, 240))):
        predict.main(predict.get_args_parser().parse_args(
            ["--weights", str(run / "best.pth"), "--input", str(image), "--out", str(tmp_path / "masks"),
             "--workers", "0", "--device", "cpu", *flags]))
        assert shapes.pop() == shape and Image.open(tmp_path / "masks" / "test_000.png").size == (480, 360)


def test_a_checkpoint_without_a_training_scale_runs_at_scale_1(weights):
    trained = inference.load_model(weights, None, torch.device("cpu"))
    assert trained.downscale == trained.test_scale == 1.0 and trained.input_scale() == 1.0
    assert trained.input_scale(4.0) == 4.0 and trained.input_scale(4.0, scale=0.5) == 0.5
    with pytest.raises(UserError, match="training downscale 'x' is not a positive number"):
        inference.parse_factor("x", "model.onnx")
    with pytest.raises(UserError, match="best.pth: test scale -1 is not a positive number"):
        inference.trained_test_scale({"config": {"train": {"test_scale": -1}}}, "best.pth")


def test_a_test_scale_is_what_validation_test_py_and_predict_run_the_model_at(quarter_scale_run, tmp_path_factory,
                                                                               tmp_path, capsys, monkeypatch):
    """train.py --downscale 4 --test-scale 1.5: the 90x120 val images run at 135x180 in validation, and test.py
    scores what validation scored; on 360x480 labels the model runs at 0.375x, and predict.py does the same."""
    from conftest import SMALL_TRAIN, train_in_process
    from engine.checkpoints import load_checkpoint
    root, _ = quarter_scale_run
    run = tmp_path_factory.mktemp("test-scale")
    train_in_process("--data-root", str(root), "--out", str(run), *SMALL_TRAIN, "--epochs", "1", "--downscale", "4",
                     "--test-scale", "1.5")
    assert "images, shrunk 4x, crops 32x32, validated at 1.5x (--test-scale)\n" in capsys.readouterr().out
    shapes = recording_model_inputs(monkeypatch)
    scored = {}
    for name, flags in (("own", []), ("training scale", ["--scale", "1"]), ("benchmark", None)):
        labels = ["--downscale", "4", *flags] if flags is not None else []
        test_script.main(test_script.get_args_parser().parse_args(
            ["--data-root", str(root), "--weights", str(run / "best.pth"), "--workers", "0", "--device", "cpu",
             "--split", "val", "--no-amp", "--json", str(tmp_path / "m.json"), *labels]))
        scored[name] = json.loads((tmp_path / "m.json").read_text())
    assert shapes == [(1, 3, 135, 180), (1, 3, 90, 120), (1, 3, 135, 180)]
    assert [scored[name]["scale"] for name in ("own", "training scale", "benchmark")] == [1.5, 1.0, 0.375]
    out = capsys.readouterr().out
    assert "model input 0.375x (135x180, the checkpoint's training scale, 1/4 of CamVid's, x its test scale 1.5), " \
           "logits resized to the labels, fp32; " in out and out.count(" images/s\n") == 3
    assert all(result["seconds"] > 0 for result in scored.values())
    validated = load_checkpoint(run / "best.pth")["metrics"]
    for metric in ("miou", "pixel_accuracy", "mean_pixel_accuracy"):
        assert scored["own"][metric] == pytest.approx(validated[metric], abs=1e-9), metric
    # the model scores otherwise at its training scale, so the equality above says which scale validation used
    assert scored["training scale"]["pixel_accuracy"] != pytest.approx(validated["pixel_accuracy"], abs=1e-6)
    import predict
    predict.main(predict.get_args_parser().parse_args(
        ["--weights", str(run / "best.pth"), "--input", str(root / "test" / "test_000.png"), "--out",
         str(tmp_path / "masks"), "--workers", "0", "--device", "cpu"]))
    assert shapes[-1] == (1, 3, 135, 180) and Image.open(tmp_path / "masks" / "test_000.png").size == (480, 360)


@pytest.mark.parametrize("value", ["0", "-1", "9"])
def test_a_test_scale_outside_0_to_8_is_one_line(quarter_scale_run, tmp_path, value):
    import train
    root, _ = quarter_scale_run
    with pytest.raises(UserError) as error:
        train.setup(train.parse_args(["--data-root", str(root), "--out", str(tmp_path / "run"), "--device", "cpu",
                                      "--test-scale", value]))
    assert str(error.value) == f"--test-scale: expected a factor in (0, 8], got {float(value)}"
    assert not (tmp_path / "run").exists()
