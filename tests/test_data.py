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


# data/class_dict.csv written out by hand: a reordered, edited or mis-parsed table shows here.
CAMVID_COLOURS = [
    ((128, 128, 128), 0),  # Sky
    ((128, 0, 0), 1),  # Building
    ((192, 192, 128), 2),  # Pole
    ((128, 64, 128), 3),  # Road
    ((0, 0, 192), 4),  # Sidewalk
    ((128, 128, 0), 5),  # Tree
    ((192, 128, 128), 6),  # SignSymbol
    ((64, 64, 128), 7),  # Fence
    ((64, 0, 128), 8),  # Car
    ((64, 64, 0), 9),  # Pedestrian
    ((0, 128, 192), 10),  # Bicyclist
    ((0, 0, 0), cfg.IGNORE_INDEX),  # unlabelled
]


def test_literal_class_dict_colours_encode_to_their_rows():
    rgb = np.array([[colour for colour, _ in CAMVID_COLOURS]], np.uint8)
    assert MaskEncoder(TABLE)(rgb).tolist() == [[label for _, label in CAMVID_COLOURS]]
    assert TABLE.names == ("Sky", "Building", "Pole", "Road", "Sidewalk", "Tree", "SignSymbol", "Fence", "Car",
                           "Pedestrian", "Bicyclist")


def test_unknown_colour_is_an_error_with_file_colour_and_count():
    rgb = colorize(np.zeros((4, 5), np.uint8), TABLE)
    rgb[0, :3] = (1, 2, 3)
    with pytest.raises(UserError, match=r"mask_L\.png: colour \(1, 2, 3\) on 3 pixels not in class_dict.csv"):
        MaskEncoder(TABLE)(rgb, "mask_L.png")


def write_pair(folder, stem, size=(8, 10), extension=".jpg", mask_size=None, color=(128, 128, 128)):
    (folder / "train").mkdir(exist_ok=True)
    (folder / "train_labels").mkdir(exist_ok=True)
    Image.new("RGB", size[::-1], (10, 20, 30)).save(folder / "train" / f"{stem}{extension}")
    Image.new("RGB", (mask_size or size)[::-1], tuple(int(c) for c in color)).save(
        folder / "train_labels" / f"{stem}_L.png")


def test_pairs_by_stem_not_by_sorted_position(tmp_path):
    # "a.png" < "a0.png" but "a0_L.png" < "a_L.png": pairing the two sorted lists by position swaps them.
    # Each mask has its own class, so a swapped pair shows in the labels, not only in the names.
    write_pair(tmp_path, "a", extension=".png", color=TABLE.colors[3])
    write_pair(tmp_path, "a0", extension=".png", color=TABLE.colors[8])
    pairs = find_pairs(tmp_path, "train")
    assert [(s, i.name, m.name) for s, i, m in pairs] == [("a", "a.png", "a_L.png"), ("a0", "a0.png", "a0_L.png")]
    dataset = CamVidDataset(tmp_path, "train", TABLE)
    assert [dataset[i][1].unique().tolist() for i in range(2)] == [[3], [8]]


@pytest.mark.parametrize("stray, message", [
    ("train/a.jpg", r"a\.png: stem 'a' also used by a\.jpg"),  # a second photo for stem a
    ("train_labels/b.png", r"b\.png: mask name must end in '_L'"),
    ("train/lonely.jpg", r"lonely\.jpg: no mask lonely_L\.png"),
    ("train_labels/orphan_L.png", r"orphan_L\.png: no image orphan"),
], ids=["duplicate-stem", "mask-without-_L", "image-without-mask", "mask-without-image"])
def test_pairing_problems_are_errors_naming_the_file(tmp_path, stray, message):
    write_pair(tmp_path, "a", extension=".png")
    Image.new("RGB", (10, 8)).save(tmp_path / stray)
    with pytest.raises(UserError, match=message):
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


LABELS = (0, 10, cfg.IGNORE_INDEX)  # far apart: a blended (bilinear) mask would hold values in between


def block_labels(seed: int, shape=(24, 36), block=3) -> torch.Tensor:
    """A random map of block×block squares of LABELS: many edges, so a one-pixel misalignment shows."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(LABELS, size=(shape[0] // block, shape[1] // block))
    return torch.from_numpy(np.kron(blocks, np.ones((block, block), np.int64)).astype(np.uint8))


def coordinate_image(mask: torch.Tensor) -> torch.Tensor:
    """Channels row+1, col+1 and the label: every output pixel says where it came from (0 = padding)."""
    rows, cols = torch.meshgrid(torch.arange(mask.shape[0]), torch.arange(mask.shape[1]), indexing="ij")
    return torch.stack([rows + 1, cols + 1, mask.long()]).to(torch.uint8)


@pytest.mark.parametrize("pipeline", [
    transforms.train_transform((32, 32), random_crop=True, flip=True),  # pads rows, crops columns
    transforms.train_transform((16, 20), random_crop=True, flip=True),
    transforms.CenterCrop((20, 40)),
])
def test_crop_and_flip_keep_every_mask_pixel_under_its_image_pixel(pipeline):
    seen = set()
    for seed in range(12):
        mask = block_labels(seed)
        out_image, out_mask = pipeline(coordinate_image(mask), mask, torch.Generator().manual_seed(seed))
        rows, cols = out_image[0].long() - 1, out_image[1].long() - 1
        padded = rows < 0
        assert (out_mask[padded] == cfg.IGNORE_INDEX).all() and (out_image[:, padded] == 0).all()
        assert torch.equal(out_mask[~padded], mask[rows[~padded], cols[~padded]])
        flipped = bool(cols[~padded][0] > cols[~padded][-1])
        seen.add((rows.max().item(), cols[~padded].min().item(), flipped))  # crop offset and flip of this draw
    if not isinstance(pipeline, transforms.CenterCrop):  # the draws really move the crop, and flip half the time
        assert len(seen) > 3 and {flipped for *_, flipped in seen} == {False, True}


def one_hot_image(mask: torch.Tensor) -> torch.Tensor:
    """Channel k is 255 where the label is LABELS[k]: bilinear blends are never pure, padding is all 0."""
    return torch.stack([(mask == label) for label in LABELS]).to(torch.uint8) * 255


@pytest.mark.parametrize("pipeline", [
    transforms.train_transform((32, 32), scale=(0.5, 2.0), flip=True),
    transforms.train_transform((16, 16), scale=(0.7, 1.3), downscale=1.5),
    transforms.eval_transform(downscale=2),
])
def test_scaling_keeps_masks_aligned_and_labels_from_the_source_set(pipeline):
    checked = total = 0
    for seed in range(12):
        mask = block_labels(seed, block=6)
        out_image, out_mask = pipeline(one_hot_image(mask), mask, torch.Generator().manual_seed(seed))
        assert set(out_mask.unique().tolist()) <= set(LABELS)  # NEAREST: no label made up in between
        pure = (out_image == 255).sum(0).eq(1) & (out_image == 0).sum(0).eq(2)  # inside one source square
        label_of_pure = torch.tensor(LABELS, dtype=torch.uint8)[out_image.argmax(0)]
        assert torch.equal(out_mask[pure], label_of_pure[pure])
        assert (out_mask[(out_image == 0).all(0)] == cfg.IGNORE_INDEX).all()  # padding
        checked, total = checked + int(pure.sum()), total + out_mask.numel()
    assert checked > total / 5, (checked, total)  # not vacuous: many pixels lie well inside a square


def test_jitter_changes_the_image_only():
    mask = block_labels(0)
    image = coordinate_image(mask) // 2 + 60
    pipeline = transforms.train_transform((24, 36), jitter=0.3)
    (first, first_mask), (second, second_mask) = (pipeline(image, mask, torch.Generator().manual_seed(s))
                                                  for s in (1, 2))
    assert not torch.equal(first, image) and not torch.equal(first, second)
    assert torch.equal(first_mask, mask) and torch.equal(second_mask, mask)
    ratio = first.float() / image.float()  # brightness alone would scale every pixel alike (no clipping here)
    assert ratio.max() - ratio.min() > 0.1  # contrast and saturation moved pixels differently


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
