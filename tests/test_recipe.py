"""Training-recipe pieces: recipe defaults, losses, class weights, schedules, staged initialisation."""
import pytest
import torch

import cfg
import train
import utils
from conftest import write_camvid
from dataset import CamVidDataset, ClassTable
from fcn import FCN, FCNConfig

TABLE = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)


def test_recipe_sets_defaults_and_explicit_flags_win():
    args = train.parse_args(["--recipe", "camvid", "--lr", "0.05"])
    assert args.optimizer == "sgd" and args.schedule == "poly" and args.scale == (0.5, 2.0) and args.flip
    assert args.lr == 0.05
    assert train.parse_args([]).optimizer == "adam"


def test_plain_loss_is_cross_entropy_ignoring_void():
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = cfg.IGNORE_INDEX
    kept = labels != cfg.IGNORE_INDEX
    per_pixel = -torch.log_softmax(logits, 1).gather(1, labels.clamp(max=2)[:, None])[:, 0]
    assert train.SegmentationLoss()(logits, labels) == pytest.approx(per_pixel[kept].mean().item(), rel=1e-5)


def test_ohem_keeps_the_hardest_fraction():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0] = torch.tensor([5.0, 1.0, -1.0, -5.0])  # class-0 pixels: easy ... hard
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").flatten()
    expected = losses.sort(descending=True).values[:2].mean()
    assert train.SegmentationLoss(ohem_fraction=0.5)(logits, labels) == pytest.approx(expected.item())


def test_median_frequency_weights_by_hand(tmp_path):
    root = write_camvid(tmp_path / "CamVid", {"train": 2})
    dataset = CamVidDataset(root, "train", TABLE)
    weights = train.median_frequency_weights(dataset, TABLE.num_classes, tmp_path / "w.json")
    pixels = torch.zeros(11, dtype=torch.float64)
    image_pixels = torch.zeros(11, dtype=torch.float64)
    for index in range(2):
        labels = dataset.load(index)[1].long()
        for c in range(11):
            count = (labels == c).sum()
            pixels[c] += count
            image_pixels[c] += labels.numel() if count else 0
    freq = pixels / image_pixels.clamp(min=1)
    present = freq > 0
    expected = torch.where(present, freq[present].median() / freq.clamp(min=1e-12), torch.zeros(()))
    assert torch.allclose(weights.double(), expected, rtol=1e-5)
    cached = train.median_frequency_weights(dataset, TABLE.num_classes, tmp_path / "w.json")
    assert torch.allclose(cached, weights)


def test_poly_schedule_with_warmup():
    model = torch.nn.Linear(2, 2)
    args = train.parse_args(["--optimizer", "sgd", "--schedule", "poly", "--warmup-epochs", "1", "--epochs", "3",
                             "--lr", "1.0"])
    optimizer = train.build_optimizer(model, args, torch.device("cpu"))
    scheduler = train.build_scheduler(optimizer, args, steps_per_epoch=2)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # linear warm-up over the first epoch
    assert lrs[2:] == pytest.approx([1.0, 0.75 ** 0.9, 0.5 ** 0.9, 0.25 ** 0.9])


def test_no_weight_decay_on_bias_and_batchnorm():
    model = FCN(FCNConfig("fcn8s", "vgg16_bn", 11, fc_width=8))
    decay, no_decay = train.parameter_groups(model, 5e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 5e-4
    bn_weight = model.features[1].weight
    assert any(p is bn_weight for p in no_decay["params"])


def test_init_from_a_coarser_variant(tmp_path):
    torch.manual_seed(0)
    coarse = FCN(FCNConfig("fcn32s", "vgg16", 11, fc_width=8))
    with torch.no_grad():
        coarse.score_fr.weight.normal_()
    path = tmp_path / "fcn32s.pth"
    utils.save_checkpoint({"model": coarse.state_dict(), "config": {"model": coarse.config.to_dict()}}, path)
    fine = FCN(FCNConfig("fcn8s", "vgg16", 11, fc_width=8))
    train.init_from(fine, str(path), TABLE)
    assert torch.equal(fine.features[0].weight, coarse.features[0].weight)
    assert torch.equal(fine.score_fr.weight, coarse.score_fr.weight)
    assert fine.upscore.weight.shape != coarse.upscore.weight.shape  # skipped, stays bilinear
