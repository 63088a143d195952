"""End to end on a tiny CamVid folder: train, resume, test --json/--report, predict, checkpoints and bad input
(in-process, one subprocess test for the exit path)."""
import csv
import json
import signal

import numpy as np
import pytest
import torch
from conftest import SMALL_TRAIN, run_cli
from PIL import Image

import cfg
import inference
import predict
import test as test_script
import train
from cfg import UserError
from dataset import ClassTable, MaskEncoder, find_pairs
from engine.checkpoints import atomic_write, load_checkpoint, save_checkpoint
from evalution_segmentaion import ConfusionMatrix, metrics_from_confusion
from fcn import FCN, FCNConfig

TABLE = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)


def test_train_writes_run_files_and_resume_continues(trained_run):
    for name in ("last.pth", "best.pth", "history.csv", "curves.png", "val_samples.png", "results.json"):
        assert (trained_run / name).is_file(), name
    results = json.loads((trained_run / "results.json").read_text())
    assert results["split"] == "val" and results["epochs"] == 2 and results["pretrained"] is False
    assert set(results["iou"]) == set(TABLE.names) and results["command"].startswith("python train.py")
    with open(trained_run / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"lr", "train_loss", "val_loss", "val_pa", "val_mpa", "val_miou", "seconds", "iou_Sky"} <= set(rows[0])
    state = load_checkpoint(trained_run / "last.pth")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert {"optimizer", "scheduler", "scaler", "best_miou", "config"} <= set(state)
    assert state["config"]["model"] == {"variant": "fcn8s", "backbone": "vgg16", "num_classes": 11, "fc_width": 16}
    assert state["best_miou"] == pytest.approx(max(float(r["val_miou"]) for r in rows))


def test_resume_when_already_done_says_so(trained_run, camvid):
    result = run_cli("train.py", "--data-root", str(camvid), "--out", str(trained_run), *SMALL_TRAIN,
                     "--epochs", "2", "--resume")
    assert "already has 2 epochs" in result.stdout


def test_test_json_and_report_match_predicted_masks(trained_run, camvid, tmp_path):
    weights = str(trained_run / "best.pth")
    result, report = tmp_path / "metrics.json", tmp_path / "report"
    printed = run_cli("test.py", "--data-root", str(camvid), "--weights", weights, "--json", str(result),
                      "--report", str(report), "--workers", "2", "--batch-size", "2").stdout
    metrics = json.loads(result.read_text())
    assert {"pixel_accuracy", "mean_pixel_accuracy", "miou", "fwiou", "iou"} <= set(metrics)
    assert list(metrics["iou"]) == list(TABLE.names) and metrics["tta"] is None
    assert f"MIoU  {metrics['miou']:.4f}" in printed and "Bicyclist" in printed
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (11, 11) and confusion.sum() == metrics["pixels"]
    assert metrics["miou"] == pytest.approx(metrics_from_confusion(torch.tensor(confusion))["miou"], abs=1e-12)
    with open(report / "confusion.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == list(TABLE.names) and [row[0] for row in rows[1:]] == list(TABLE.names)
    assert np.array([row[1:] for row in rows[1:]], dtype=np.int64).tolist() == metrics["confusion"]
    with open(report / "per_class.csv") as handle:
        per_class = {row["class"]: row for row in csv.DictReader(handle)}
    assert int(per_class["Sky"]["pixels"]) == confusion[0].sum()
    assert Image.open(report / "confusion.png").size[0] > 300
    samples = Image.open(report / "samples.png")  # 3 rows of photo | truth | prediction, then the legend
    assert samples.size[0] == 3 * 96 and samples.size[1] > 3 * 64
    # Independently: predict.py's colour masks (workers, batches of 2), decoded and scored against the truth.
    masks = tmp_path / "masks"
    run_cli("predict.py", "--weights", weights, "--input", str(camvid / "test"), "--out", str(masks), "--overlay",
            "--workers", "2", "--batch-size", "2")
    scored = ConfusionMatrix(TABLE.num_classes)
    encoder = MaskEncoder(TABLE)
    for stem, _, truth_path in find_pairs(camvid, "test"):
        predicted = encoder(np.asarray(Image.open(masks / f"{stem}.png").convert("RGB")))
        truth = encoder(np.asarray(Image.open(truth_path).convert("RGB")))
        scored.update(torch.from_numpy(predicted), torch.from_numpy(truth))
        assert (masks / f"{stem}_overlay.png").is_file()
    assert scored.matrix.tolist() == metrics["confusion"]


def test_predict_any_size_greyscale_rgba_and_skips_non_images(trained_run, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("L", (50, 37), 90).save(inputs / "grey.png")
    Image.new("RGBA", (41, 33), (1, 2, 3, 200)).save(inputs / "rgba.png")
    (inputs / "broken.png").write_bytes(b"not a png")
    (inputs / "notes.txt").write_text("not an image")
    assert run_predict(["--weights", str(trained_run / "last.pth"), "--input", str(inputs),
                        "--out", str(tmp_path / "out"), "--workers", "2"]) == 2
    stderr = capsys.readouterr().err
    assert "skipped" in stderr and "notes.txt" in stderr and "broken.png: not a readable image" in stderr
    assert Image.open(tmp_path / "out" / "grey.png").size == (50, 37)
    colours = set(map(tuple, np.asarray(Image.open(tmp_path / "out" / "rgba.png")).reshape(-1, 3).tolist()))
    assert colours <= set(map(tuple, TABLE.colors.tolist()))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match="none of the 1 file"):
        run_predict(["--weights", str(trained_run / "last.pth"), "--input", str(tmp_path / "a.txt"),
                     "--out", str(tmp_path / "out2")])


@pytest.fixture
def keep_signal_handlers():
    """engine.loop.fit installs SIGINT/SIGTERM handlers; put pytest's back after an in-process run."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def raises_user_error(call, *argv: str) -> str:
    with pytest.raises(UserError) as error:
        call(list(argv))
    return str(error.value)


def run_train(argv):
    train.main(train.parse_args(argv))


def run_test(argv):
    test_script.main(test_script.get_args_parser().parse_args(argv))


def run_predict(argv):
    return predict.main(predict.get_args_parser().parse_args(argv))


def test_bad_inputs_raise_one_clear_message(trained_run, camvid, tmp_path, keep_signal_handlers):
    assert "--data-root" in raises_user_error(run_train, "--data-root", str(tmp_path / "nope"))
    assert "checkpoint not found" in raises_user_error(run_test, "--data-root", str(camvid),
                                                       "--weights", str(tmp_path / "x.pth"))
    assert "--epochs" in raises_user_error(run_train, "--data-root", str(camvid), "--epochs", "0")
    assert "--accum-steps: expected a positive integer" in raises_user_error(
        run_train, "--data-root", str(camvid), "--accum-steps", "0")
    assert "--resume: no run folder" in raises_user_error(
        run_train, "--data-root", str(camvid), "--out", str(tmp_path / "fresh"), "--resume", "--device", "cpu")
    (tmp_path / "early").mkdir()
    assert "last.pth does not exist: the run in" in raises_user_error(
        run_train, "--data-root", str(camvid), "--out", str(tmp_path / "early"), "--resume", "--device", "cpu")
    (tmp_path / "a-file").write_text("")
    assert "--out" in raises_user_error(run_train, "--data-root", str(camvid), "--out", str(tmp_path / "a-file"))
    assert "--time-budget 5x: expected a positive duration" in raises_user_error(
        run_train, "--data-root", str(camvid), "--time-budget", "5x")
    if not torch.cuda.is_available():
        assert "--device cuda" in raises_user_error(run_test, "--data-root", str(camvid), "--weights",
                                                    str(trained_run / "last.pth"), "--device", "cuda")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    message = raises_user_error(run_predict, "--weights", str(garbage), "--input", str(camvid / "test"),
                                "--out", str(tmp_path / "o"))
    assert "garbage.pth: not a checkpoint written by this project, or damaged" in message
    assert "weights_only" not in message  # torch's advice to load it unsafely is not passed on
    model = FCN(FCNConfig("fcn8s", "vgg16", num_classes=5, fc_width=8))
    five = tmp_path / "five.pth"
    save_checkpoint({"model": model.state_dict(), "config": {"model": model.config.to_dict()}}, five)
    assert "predicts 5 classes but the class table has 11" in raises_user_error(
        run_test, "--data-root", str(camvid), "--weights", str(five))
    assert "--tta" in raises_user_error(run_test, "--data-root", str(camvid), "--weights", str(five), "--tta", "x")


def camvid_with_unknown_colour(root):
    from conftest import write_camvid
    root = write_camvid(root, {"train": 2, "val": 1, "test": 2})
    for split in ("train", "test"):
        mask_path = root / f"{split}_labels" / f"{split}_001_L.png"
        mask = np.asarray(Image.open(mask_path)).copy()
        mask[:2, :2] = (7, 7, 7)
        Image.fromarray(mask).save(mask_path)
    return root


def test_unknown_label_colour_in_a_worker_stops_training(tmp_path, keep_signal_handlers):
    root = camvid_with_unknown_colour(tmp_path / "CamVid")
    message = raises_user_error(run_train, "--data-root", str(root), "--out", str(tmp_path / "run"), *SMALL_TRAIN,
                                "--epochs", "1", "--workers", "2", "--no-label-cache")
    assert message == f"{root / 'train_labels' / 'train_001_L.png'}: colour (7, 7, 7) on 4 pixels not in class_dict.csv"
    assert not (tmp_path / "run" / "last.pth").exists()


def test_worker_error_exits_with_one_line(trained_run, tmp_path):
    """The exit path as users see it (test_inference checks the message equals the --workers 0 one)."""
    root = camvid_with_unknown_colour(tmp_path / "CamVid")
    result = run_cli("test.py", "--data-root", str(root), "--weights", str(trained_run / "last.pth"),
                     "--workers", "2", "--batch-size", "2", "--no-label-cache", check=False)
    assert result.returncode == 2, result.stderr
    mask = root / "test_labels" / "test_001_L.png"
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]  # beside the tqdm bar
    assert errors == [f"error: {mask}: colour (7, 7, 7) on 4 pixels not in class_dict.csv"], result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    model = FCN(FCNConfig("fcn16s", "vgg16_bn", num_classes=11, fc_width=8))
    path = tmp_path / "c.pth"
    save_checkpoint({"model": model.state_dict(), "config": {"model": model.config.to_dict()}, "epoch": 3}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temporary file left behind
    state = load_checkpoint(path)
    restored = inference.model_from_checkpoint(state, TABLE, path)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)

    def crash(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert load_checkpoint(path)["epoch"] == 3  # the old file survived intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_scripts_import_without_side_effects():
    import importlib
    for name in ("train", "test", "predict", "inference", "dataset", "fcn", "evalution_segmentaion", "cfg"):
        module = importlib.import_module(name)
        if hasattr(module, "get_args_parser"):
            assert module.get_args_parser().prog


def test_nan_loss_stops_with_a_message_and_writes_no_checkpoint(trained_run, camvid, tmp_path):
    """Diverged in its first epoch: one line, exit 1, no checkpoint of NaN weights, results.json says why
    (a later divergence keeping the good checkpoints: tests/test_budget.py)."""
    run_dir = tmp_path / "run"
    state = load_checkpoint(trained_run / "last.pth")
    state["model"]["score_fr.weight"].fill_(float("nan"))  # poisoned weights: the first loss is NaN
    save_checkpoint({"model": state["model"], "config": state["config"]}, tmp_path / "nan.pth")
    result = run_cli("train.py", "--data-root", str(camvid), "--out", str(run_dir), *SMALL_TRAIN,
                     "--epochs", "1", "--init-from", str(tmp_path / "nan.pth"), check=False)
    assert result.returncode == 1, result.stderr
    assert "loss became NaN/inf in epoch 1" in result.stderr and "the last good checkpoints are kept" in result.stderr
    assert not list(run_dir.glob("*.pth"))
    results = json.loads((run_dir / "results.json").read_text())
    assert not results["completed"] and results["stop_reason"].startswith("diverged: loss became NaN/inf")
