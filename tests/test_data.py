"""Class table, hash label encoding, pairing by stem, joint transforms and the index-release conversion."""
import numpy as np
import pytest
import torch
from PIL import Image

import cfg
import transforms
from cfg import UserError
from conftest import write_camvid
from dataset import (CamVidDataset, ClassTable, MaskEncoder, color_hash, colorize, convert_index_release,
                     find_pairs, normalize_batch, packed_color_hash)

TABLE = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)


def test_class_table_has_11_classes_and_void():
    assert TABLE.num_classes == 11 and TABLE.names[0] == "Sky" and TABLE.names[-1] == "Bicyclist"
    assert TABLE.void_colors.tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("text, message", [
    ("name,r,g\nSky,1,2\n", "expected columns name,r,g,b"),
    ("name,r,g,b\nSky,1,2,300\n", "0..255"),
    ("name,r,g,b\nSky,1,2,3\nRoad,1,2,3\n", "share a colour"),
    ("name,r,g,b\nunlabelled,0,0,0\n", "real classes"),
])
def test_bad_class_table(tmp_path, text, message):
    path = tmp_path / "class_dict.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        ClassTable.from_csv(path)


def test_hash_is_r_g_b_in_base_256():
    rgb = np.array([[[1, 2, 3], [255, 255, 255]]], np.uint8)
    assert color_hash(rgb).tolist() == [[(1 * 256 + 2) * 256 + 3, 256 ** 3 - 1]]
    random = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(packed_color_hash(random), color_hash(random).reshape(-1))


def test_encoding_round_trip():
    labels = np.random.default_rng(1).integers(0, 11, (20, 30)).astype(np.uint8)
    labels[0] = cfg.IGNORE_INDEX
    assert np.array_equal(MaskEncoder(TABLE)(colorize(labels, TABLE)), labels)


def test_each_class_colour_maps_to_its_row():
    encoded = MaskEncoder(TABLE)(TABLE.colors[None])
    assert encoded.tolist() == [list(range(11))]
    assert MaskEncoder(TABLE)(np.zeros((1, 1, 3), np.uint8)).item() == cfg.IGNORE_INDEX


def test_unknown_colour_is_an_error_with_file_colour_and_count():
    rgb = colorize(np.zeros((4, 5), np.uint8), TABLE)
    rgb[0, :3] = (1, 2, 3)
    with pytest.raises(UserError, match=r"mask_L\.png: colour \(1, 2, 3\) on 3 pixels not in class_dict.csv"):
        MaskEncoder(TABLE)(rgb, "mask_L.png")


def write_pair(folder, stem, size=(8, 10), extension=".jpg", mask_size=None):
    (folder / "train").mkdir(exist_ok=True)
    (folder / "train_labels").mkdir(exist_ok=True)
    Image.new("RGB", size[::-1], (10, 20, 30)).save(folder / "train" / f"{stem}{extension}")
    Image.new("RGB", (mask_size or size)[::-1], (128, 128, 128)).save(folder / "train_labels" / f"{stem}_L.png")


def test_pairs_by_stem_not_by_sorted_position(tmp_path):
    # Sorted separately the lists would misalign: "b.jpg" < "c.png" but masks sort a_L, b_L, c_L.
    for stem, ext in [("c", ".png"), ("b", ".jpg"), ("a", ".png")]:
        write_pair(tmp_path, stem, extension=ext)
    pairs = find_pairs(tmp_path, "train")
    assert [(s, i.name, m.name) for s, i, m in pairs] == [
        ("a", "a.png", "a_L.png"), ("b", "b.jpg", "b_L.png"), ("c", "c.png", "c_L.png")]


def test_missing_mask_names_the_image(tmp_path):
    write_pair(tmp_path, "a")
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "lonely.jpg")
    with pytest.raises(UserError, match=r"lonely\.jpg: no mask lonely_L\.png"):
        find_pairs(tmp_path, "train")


def test_missing_image_names_the_mask(tmp_path):
    write_pair(tmp_path, "a")
    Image.new("RGB", (4, 4)).save(tmp_path / "train_labels" / "orphan_L.png")
    with pytest.raises(UserError, match=r"orphan_L\.png: no image orphan"):
        find_pairs(tmp_path, "train")


def test_missing_split_folder(tmp_path):
    with pytest.raises(UserError, match="train: folder not found"):
        find_pairs(tmp_path, "train")


def test_size_mismatch_names_both_files(tmp_path):
    write_pair(tmp_path, "a", size=(8, 10), mask_size=(8, 12))
    dataset = CamVidDataset(tmp_path, "train", TABLE)
    with pytest.raises(UserError, match=r"a_L\.png: size 12x8 differs from its image a\.jpg \(10x8\)"):
        dataset[0]


def test_unreadable_image_is_named(tmp_path):
    write_pair(tmp_path, "a")
    (tmp_path / "train" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"a\.jpg: not a readable image"):
        CamVidDataset(tmp_path, "train", TABLE)[0]


def test_dataset_items_and_limit(tmp_path):
    root = write_camvid(tmp_path / "CamVid", {"train": 3})
    dataset = CamVidDataset(root, "train", TABLE, limit=2)
    assert len(dataset) == 2 and [p[0] for p in dataset.pairs] == ["train_000", "train_001"]
    image, labels = dataset[0]
    assert image.shape == (3, 64, 96) and image.dtype == torch.uint8
    assert labels.shape == (64, 96) and labels.dtype == torch.uint8
    assert set(labels.unique().tolist()) <= set(range(11)) | {cfg.IGNORE_INDEX}
    assert (labels[:, :3] == cfg.IGNORE_INDEX).all()
    dataset.preload(threads=2)
    assert torch.equal(dataset[0][1], labels)


def test_greyscale_and_rgba_images_are_read_as_rgb(tmp_path):
    from dataset import read_image
    Image.new("L", (5, 4), 7).save(tmp_path / "grey.png")
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "grey.png").shape == (3, 4, 5)
    assert read_image(tmp_path / "rgba.png")[:, 0, 0].tolist() == [1, 2, 3]


def test_normalize_batch_is_imagenet_normalisation():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_batch(images, channels_last=True)
    expected = (1 - torch.tensor(cfg.IMAGENET_MEAN)) / torch.tensor(cfg.IMAGENET_STD)
    assert torch.allclose(out[0, :, 0, 0], expected)
    assert out.is_contiguous(memory_format=torch.channels_last)


def sample():
    image = torch.arange(3 * 10 * 12, dtype=torch.int64).reshape(3, 10, 12).to(torch.uint8)
    mask = (torch.arange(10 * 12).reshape(10, 12) % 11).to(torch.uint8)
    return image, mask


def test_center_crop_is_deterministic_and_pads_with_ignore():
    image, mask = sample()
    out_image, out_mask = transforms.CenterCrop((8, 8))(image, mask)
    assert torch.equal(out_mask, mask[1:9, 2:10]) and torch.equal(out_image, image[:, 1:9, 2:10])
    _, padded = transforms.CenterCrop((12, 12))(image, mask)
    assert padded.shape == (12, 12) and (padded[10:] == cfg.IGNORE_INDEX).all()


def test_random_transforms_move_image_and_mask_together():
    image, mask = sample()
    image[0] = mask  # the first channel carries the labels: any misalignment shows
    pipeline = transforms.train_transform((16, 16), scale=(0.5, 2.0), flip=True)
    for seed in range(20):
        out_image, out_mask = pipeline(image, mask, torch.Generator().manual_seed(seed))
        assert out_mask.shape == (16, 16) and out_image.shape == (3, 16, 16)
        labelled = out_mask != cfg.IGNORE_INDEX
        assert set(out_mask[labelled].unique().tolist()) <= set(range(11))  # NEAREST: no blended labels
    same = [pipeline(image, mask, torch.Generator().manual_seed(3))[1] for _ in range(2)]
    assert torch.equal(*same)


def test_flip_mirrors_both():
    image, mask = sample()
    out_image, out_mask = transforms.RandomHorizontalFlip(p=1.0)(image, mask)
    assert torch.equal(out_mask, mask.flip(-1)) and torch.equal(out_image, image.flip(-1))


def test_convert_index_release(tmp_path):
    source = tmp_path / "SegNet" / "CamVid"
    rng = np.random.default_rng(0)
    originals = {}
    for split in cfg.SPLITS:
        (source / split).mkdir(parents=True)
        (source / f"{split}annot").mkdir()
        for stem in ("0001TP_006690", "Seq05VD_f00000"):
            index = rng.integers(0, 12, (6, 8)).astype(np.uint8)  # 11 is the release's void
            Image.fromarray(index).save(source / f"{split}annot" / f"{stem}.png")
            Image.new("RGB", (8, 6), (5, 5, 5)).save(source / split / f"{stem}.png")
            originals[split, stem] = index
    counts = convert_index_release(source, tmp_path / "CamVid", TABLE)
    assert counts == {"train": 2, "val": 2, "test": 2}
    dataset = CamVidDataset(tmp_path / "CamVid", "val", ClassTable.from_csv(tmp_path / "CamVid" / "class_dict.csv"))
    expected = originals["val", "0001TP_006690"].copy()
    expected[expected == 11] = cfg.IGNORE_INDEX
    assert np.array_equal(dataset[0][1].numpy(), expected)


def test_convert_rejects_out_of_range_index(tmp_path):
    source = tmp_path / "CamVid"
    for split in cfg.SPLITS:
        (source / split).mkdir(parents=True)
        (source / f"{split}annot").mkdir()
        Image.fromarray(np.full((2, 2), 40, np.uint8)).save(source / f"{split}annot" / "a.png")
        Image.new("RGB", (2, 2)).save(source / split / "a.png")
    with pytest.raises(UserError, match="label 40 beyond"):
        convert_index_release(source, tmp_path / "out", TABLE)
