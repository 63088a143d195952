"""The on-disk label cache: hits equal fresh decoding, edits invalidate, bad files are misses, errors unchanged."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import cfg
from cfg import UserError
from conftest import write_camvid
from dataset import CamVidDataset, ClassTable, LabelCache, MaskEncoder, default_label_cache

TABLE = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)


@pytest.fixture
def root(tmp_path):
    return write_camvid(tmp_path / "CamVid", {"train": 2})


def entries(folder):
    return sorted(folder.glob("*.npy"))


def all_labels(dataset):
    return [dataset[i][1] for i in range(len(dataset))]


def test_hit_equals_uncached_and_is_a_plain_npy(root, tmp_path):
    folder = tmp_path / "cache"
    expected = all_labels(CamVidDataset(root, "train", TABLE))
    cached = CamVidDataset(root, "train", TABLE, label_cache=LabelCache(folder))
    for _ in range(2):  # cold pass writes, warm pass reads
        assert all(torch.equal(a, b) for a, b in zip(all_labels(cached), expected))
    assert len(entries(folder)) == 2 and not list(folder.glob(".*.tmp"))
    stored = sorted(np.load(path).tobytes() for path in entries(folder))
    assert stored == sorted(labels.numpy().tobytes() for labels in expected)


def test_warm_pass_does_not_decode_masks(root, tmp_path, monkeypatch):
    dataset = CamVidDataset(root, "train", TABLE, label_cache=LabelCache(tmp_path / "cache"))
    all_labels(dataset)
    monkeypatch.setattr(dataset, "encode_mask", lambda *args: pytest.fail("decoded a cached mask"))
    all_labels(dataset)


def test_editing_a_mask_invalidates_its_entry(root, tmp_path):
    dataset = CamVidDataset(root, "train", TABLE, label_cache=LabelCache(tmp_path / "cache"))
    before = dataset[0][1]
    mask = dataset.pairs[0][2]
    Image.new("RGB", tuple(before.shape[::-1]), tuple(int(c) for c in TABLE.colors[3])).save(mask)
    stat = os.stat(mask)
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # a new mtime even on a coarse clock
    after = dataset[0][1]
    assert (after == 3).all() and not torch.equal(after, before)
    assert len(entries(tmp_path / "cache")) == 2  # the old entry stays, unused


def test_class_table_is_part_of_the_key(root, tmp_path):
    lines = cfg.DEFAULT_CLASS_DICT.read_text().splitlines()
    reordered = tmp_path / "class_dict.csv"
    reordered.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    other = ClassTable.from_csv(reordered)
    assert MaskEncoder(other).digest != MaskEncoder(TABLE).digest
    cache = LabelCache(tmp_path / "cache")
    first = CamVidDataset(root, "train", TABLE, label_cache=cache)[0][1]
    second = CamVidDataset(root, "train", other, label_cache=cache)[0][1]
    assert torch.equal(second, CamVidDataset(root, "train", other)[0][1]) and not torch.equal(first, second)
    assert len(entries(tmp_path / "cache")) == 2


@pytest.mark.parametrize("damage", [
    lambda data: data[: len(data) // 2],  # truncated
    lambda data: data + b"\0",  # trailing bytes
    lambda data: b"garbage" + data[7:],  # bad header
    lambda data: b"",  # empty
])
def test_corrupt_entry_is_a_miss_and_is_rewritten(root, tmp_path, damage):
    dataset = CamVidDataset(root, "train", TABLE, label_cache=LabelCache(tmp_path / "cache"))
    expected = dataset[0][1]
    (entry,) = entries(tmp_path / "cache")
    good = entry.read_bytes()
    entry.write_bytes(damage(good))
    assert torch.equal(dataset[0][1], expected)
    assert entry.read_bytes() == good


def test_entry_of_another_shape_is_a_miss(root, tmp_path):
    dataset = CamVidDataset(root, "train", TABLE, label_cache=LabelCache(tmp_path / "cache"))
    expected = dataset[0][1]
    (entry,) = entries(tmp_path / "cache")
    np.save(entry, np.zeros((expected.shape[1], expected.shape[0]), np.uint8))  # same bytes, transposed
    assert torch.equal(dataset[0][1], expected)


def test_size_mismatch_on_a_cached_mask_is_the_usual_error(root, tmp_path):
    dataset = CamVidDataset(root, "train", TABLE, label_cache=LabelCache(tmp_path / "cache"))
    dataset[0]
    image = dataset.pairs[0][1]
    Image.new("RGB", (90, 64)).save(image)  # the image changes size, the cached mask does not
    message = r"train_000_L\.png: size 96x64 differs from its image train_000\.png \(90x64\)"
    with pytest.raises(UserError, match=message):
        dataset[0]


def test_unknown_colour_raises_on_first_encode_and_is_not_cached(root, tmp_path):
    dataset = CamVidDataset(root, "train", TABLE, label_cache=LabelCache(tmp_path / "cache"))
    mask = dataset.pairs[0][2]
    colors = np.array(Image.open(mask))
    colors[0, :5] = (1, 2, 3)
    Image.fromarray(colors).save(mask)
    for _ in range(2):
        with pytest.raises(UserError, match=r"train_000_L\.png: colour \(1, 2, 3\) on 5 pixels not in class_dict"):
            dataset[0]
    assert not entries(tmp_path / "cache")


def test_unwritable_folder_falls_back_with_one_warning(root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a folder under a regular file cannot be created, even by root
    with pytest.warns(UserWarning, match="not writable") as caught:
        cache = LabelCache(blocker / "cache")
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        labels = all_labels(CamVidDataset(root, "train", TABLE, label_cache=cache))
    assert len(caught) == 1 and not cache.enabled
    assert not [w for w in later if "label cache" in str(w.message)]  # no warning per image
    assert all(torch.equal(a, b) for a, b in zip(labels, all_labels(CamVidDataset(root, "train", TABLE))))


def test_write_failure_disables_the_cache(root, tmp_path, monkeypatch):
    cache = LabelCache(tmp_path / "cache")
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(PermissionError("read-only")))
    with pytest.warns(UserWarning, match="read-only"):
        labels = all_labels(CamVidDataset(root, "train", TABLE, label_cache=cache))
    assert not cache.enabled and not list((tmp_path / "cache").iterdir())  # temp files removed
    assert all(torch.equal(a, b) for a, b in zip(labels, all_labels(CamVidDataset(root, "train", TABLE))))


def test_preload_uses_the_cache(root, tmp_path):
    dataset = CamVidDataset(root, "train", TABLE, label_cache=LabelCache(tmp_path / "cache"))
    dataset.preload(threads=2)
    assert len(entries(tmp_path / "cache")) == 2
    assert torch.equal(dataset[1][1], CamVidDataset(root, "train", TABLE)[1][1])


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(cfg.LABEL_CACHE_ENV, str(tmp_path))
    assert default_label_cache() == tmp_path
    monkeypatch.setenv(cfg.LABEL_CACHE_ENV, "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_label_cache() == tmp_path / "home" / ".cache" / "fcn-camvid" / "labels"


def test_workers_racing_on_one_entry(root, tmp_path):
    dataset = CamVidDataset(root, "train", TABLE, label_cache=LabelCache(tmp_path / "cache"))
    expected = CamVidDataset(root, "train", TABLE)[0][1]
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=[0] * 16, num_workers=2)
    assert all(torch.equal(labels[0], expected) for _, labels in loader)
    assert len(entries(tmp_path / "cache")) == 1 and not list((tmp_path / "cache").glob(".*"))
