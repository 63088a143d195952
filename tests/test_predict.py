"""predict.py in-process: batched masks equal the one inference path, --format, output names, video."""
import numpy as np
import pytest
import torch
from PIL import Image

import cfg
import devices
import inference
import predict
from cfg import UserError
from dataset import ClassTable, read_image
from engine.checkpoints import save_checkpoint
from fcn import FCN, FCNConfig

TABLE = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = FCN(FCNConfig("fcn8s", "vgg16", num_classes=TABLE.num_classes, fc_width=16))
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    path = tmp_path_factory.mktemp("weights") / "random.pth"
    save_checkpoint({"model": model.state_dict(), "config": {"model": model.config.to_dict()}}, path)
    return path


def photo(path, size=(96, 64), seed=0):
    """A random RGB image of size (W, H)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run(weights, inputs, out, *flags):
    args = predict.get_args_parser().parse_args(
        ["--weights", str(weights), "--input", *map(str, inputs), "--out", str(out), "--device", "cpu", *flags])
    return predict.main(args)


def test_batched_workers_match_the_inference_path_and_formats(weights, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = [(96, 64), (96, 64), (96, 64), (80, 48), (96, 64)]  # a size change starts a new batch
    for index, size in enumerate(sizes):
        photo(folder / f"f{index}.png", size, seed=index)
    assert run(weights, [folder], tmp_path / "out", "--workers", "2", "--batch-size", "2", "--format", "both") == 5
    model = inference.load_model(weights, None, torch.device("cpu")).model
    plain = inference.Runner(model, torch.device("cpu"), devices.amp_dtype(torch.device("cpu"), True))  # predict's default
    for index, size in enumerate(sizes):
        expected = plain.labels(read_image(folder / f"f{index}.png")[None])[0].numpy()
        index_png = Image.open(tmp_path / "out" / f"f{index}_index.png")
        assert index_png.mode == "L" and index_png.size == size
        np.testing.assert_array_equal(np.asarray(index_png), expected)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"f{index}.png")),
                                      TABLE.palette()[expected])
    run(weights, [folder / "f3.png"], tmp_path / "idx", "--format", "index", "--workers", "0")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["f3.png"]
    assert Image.open(tmp_path / "idx" / "f3.png").mode == "L"


def test_output_names_mirror_the_inputs_and_never_collide(weights, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        photo(tmp_path / folder / "x.png")
    run(weights, [tmp_path / "a", tmp_path / "b"], tmp_path / "out", "--workers", "0", "--overlay")
    assert {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")} == \
        {"a/x.png", "a/x_overlay.png", "b/x.png", "b/x_overlay.png"}
    photo(tmp_path / "a" / "x.jpg")
    with pytest.raises(UserError, match="x.jpg and .*x.png would both write"):
        run(weights, [tmp_path / "a"], tmp_path / "clash")
    with pytest.raises(UserError, match="would overwrite the input"):
        run(weights, [tmp_path / "b"], tmp_path / "b")
    assert not (tmp_path / "clash").exists()


def test_scale_and_tta_reach_the_model(weights, tmp_path):
    source = photo(tmp_path / "p.png", (128, 96))
    run(weights, [source], tmp_path / "out", "--scale", "0.5", "--tta", "flip,1,1.5", "--format", "index")
    model = inference.load_model(weights, None, torch.device("cpu")).model
    expected = inference.Runner(model, torch.device("cpu"), devices.amp_dtype(torch.device("cpu"), True), scale=0.5,
                                tta=inference.parse_tta("flip,1,1.5"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "p.png")),
                                  expected.labels(read_image(source)[None])[0].numpy())


def write_video(path, frames=12, size=(96, 64), fps=10):
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for index in range(frames):
            pixels = np.full((size[1], size[0], 3), index * 20, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_video_keeps_size_frame_count_and_rate(weights, tmp_path):
    av = pytest.importorskip("av")
    source = write_video(tmp_path / "drive.mp4")
    assert run(weights, [source], tmp_path / "out", "--overlay", "--batch-size", "5") == 12
    with av.open(str(tmp_path / "out" / "drive.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, stream.average_rate) == (96, 64, 10)
        assert sum(1 for _ in container.decode(stream)) == 12
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["drive.mp4"]  # no temporary file left


def test_video_without_pyav_is_one_line(weights, tmp_path, monkeypatch):
    (tmp_path / "drive.mp4").write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # import av now raises ImportError
    with pytest.raises(UserError, match="pip install av"):
        run(weights, [tmp_path / "drive.mp4"], tmp_path / "out")


def three_class_checkpoint(folder):
    """A random 3-class model whose checkpoint carries its own class table (not CamVid's)."""
    csv = folder / "three.csv"
    csv.write_text("name,r,g,b\nroad,10,20,30\nlane,200,100,0\nkerb,0,250,50\nvoid,0,0,0\n")
    table = ClassTable.from_csv(csv)
    torch.manual_seed(1)
    model = FCN(FCNConfig("fcn8s", "vgg16", num_classes=3, fc_width=8))
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    path = folder / "three.pth"
    save_checkpoint({"model": model.state_dict(), "config": {"model": model.config.to_dict()},
                           "class_names": list(table.names), "class_table": table.to_dict()}, path)
    return path, table


def test_a_checkpoint_paints_its_own_classes(tmp_path):
    """No --class-dict: the colours come from the checkpoint; a --class-dict with other names is refused."""
    weights, table = three_class_checkpoint(tmp_path)
    image = photo(tmp_path / "a.png")
    run(weights, [image], tmp_path / "out", "--workers", "0", "--format", "both")
    labels = np.asarray(Image.open(tmp_path / "out" / "a_index.png"))
    painted = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    np.testing.assert_array_equal(painted, table.palette()[labels])
    assert set(map(tuple, painted.reshape(-1, 3))) <= {(10, 20, 30), (200, 100, 0), (0, 250, 50)}
    recoloured = tmp_path / "recoloured.csv"
    recoloured.write_text("name,r,g,b\nroad,1,1,1\nlane,2,2,2\nkerb,3,3,3\n")
    run(weights, [image], tmp_path / "recoloured", "--workers", "0", "--class-dict", str(recoloured))
    assert set(map(tuple, np.asarray(Image.open(tmp_path / "recoloured" / "a.png")).reshape(-1, 3))) <= \
        {(1, 1, 1), (2, 2, 2), (3, 3, 3)}
    with pytest.raises(UserError, match="classes Sky, Building.* differ from the 3 that .*three.pth was trained on: "
                                        "road, lane, kerb"):
        run(weights, [image], tmp_path / "camvid", "--class-dict", str(cfg.DEFAULT_CLASS_DICT))
