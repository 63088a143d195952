"""Training-recipe pieces: recipe defaults, losses, class weights, schedules, staged initialisation, and every
flag traced from the command line through train.setup() to what the run does."""

import pytest
import torch
from conftest import SMALL_TRAIN, settings_of

import cfg
import train
import transforms
from dataset import CamVidDataset, ClassTable
from engine.build import build_optimizer, init_from
from engine.checkpoints import save_checkpoint
from engine.loss import SegmentationLoss, class_weights, median_frequency_weights
from engine.run import Runtime
from engine.schedule import build_scheduler
from engine.step import train_step
from fcn import FCN, FCNConfig, bilinear_kernel

V = cfg.IGNORE_INDEX


def test_recipe_sets_defaults_and_explicit_flags_win():
    args = train.parse_args(["--recipe", "camvid", "--lr", "0.05"])
    assert args.optimizer == "sgd" and args.schedule == "poly" and args.scale == (0.5, 2.0) and args.flip
    assert args.lr == 0.05
    assert train.parse_args([]).optimizer == "adam"


@pytest.mark.parametrize("cuda, flags, recipe", [
    (False, [], "camvid-cpu"), (True, [], "camvid"), (True, ["--device", "cpu"], "camvid-cpu"),
    (False, ["--device", "cuda"], "camvid")])
def test_recipe_auto_fits_the_machine(monkeypatch, capsys, cuda, flags, recipe):
    """--recipe auto: the full recipe where the device is a CUDA GPU, the CPU recipe elsewhere, said in one line;
    the chosen recipe's defaults apply and explicit flags still win."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = train.parse_args(["--recipe", "auto", *flags, "--eval-every", "3"])
    assert args.recipe == recipe and args.eval_every == 3
    expected = train.parse_args(["--recipe", recipe, *flags, "--eval-every", "3"])
    assert vars(args) == vars(expected)
    assert capsys.readouterr().out.startswith(f"--recipe auto: {recipe}, ")


def test_the_docs_list_exactly_the_cpu_recipe():
    """docs/training.md's camvid-cpu row: `camvid`, then the flags that turn it into camvid-cpu, all of them."""
    row = next(line for line in (cfg.REPO_ROOT / "docs" / "training.md").read_text().splitlines()
               if line.startswith("| `camvid-cpu` |"))
    flags = row.split("`camvid`, then `")[1].split("`")[0].split()
    documented = vars(train.parse_args(["--recipe", "camvid", *flags])) | {"recipe": "camvid-cpu"}
    assert documented == vars(train.parse_args(["--recipe", "camvid-cpu"]))


def test_a_misspelt_recipe_key_is_an_error_naming_it(monkeypatch):
    monkeypatch.setitem(train.RECIPES, "camvid", {**train.RECIPES["camvid"], "warmup_epoch": 5})
    with pytest.raises(ValueError, match=r"RECIPES\['camvid'\]: warmup_epoch is not a train.py option"):
        train.parse_args([])


def test_plain_loss_is_cross_entropy_ignoring_void():
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = V
    kept = labels != V
    per_pixel = -torch.log_softmax(logits, 1).gather(1, labels.clamp(max=2)[:, None])[:, 0]
    assert SegmentationLoss()(logits, labels) == pytest.approx(per_pixel[kept].mean().item(), rel=1e-5)


def test_ohem_keeps_the_hardest_fraction():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0] = torch.tensor([5.0, 1.0, -1.0, -5.0])  # class-0 pixels: easy ... hard
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").flatten()
    expected = losses.sort(descending=True).values[:2].mean()
    assert SegmentationLoss(ohem_fraction=0.5)(logits, labels) == pytest.approx(expected.item())
    # With 2 of 4 pixels void, the hardest 3 of 4 are the 2 labelled ones: their mean, not their sum over 3
    labels[0, 0, :2] = V
    assert SegmentationLoss(ohem_fraction=0.75)(logits, labels) == pytest.approx(losses[2:].mean().item())


class Masks:
    """The one method median_frequency_weights reads: load(i) -> (image, labels)."""

    def __init__(self, *masks):
        self.masks = [torch.tensor(mask, dtype=torch.uint8) for mask in masks]

    def __len__(self):
        return len(self.masks)

    def load(self, index):
        return None, self.masks[index]


def test_median_frequency_weights_by_hand(tmp_path):
    # freq_c = pixels of c / all pixels (void too) of the images that contain c; weight_c = median(freq) / freq_c
    #   class 0: 3 px in image A (4 px)          -> 3/4
    #   class 1: 1 + 2 px in images A and B (8)  -> 3/8
    #   class 2: 1 px in image B (4 px)          -> 1/4
    #   class 3: absent                          -> weight 0
    # median(3/4, 3/8, 1/4) = 3/8 -> weights 1/2, 1, 3/2, 0
    dataset = Masks([[0, 0], [0, 1]], [[1, 1], [2, V]])
    weights = median_frequency_weights(dataset, 4)
    assert weights.tolist() == pytest.approx([0.5, 1.0, 1.5, 0.0])
    assert class_weights(dataset, 4, None, tmp_path / "w.json").tolist() == weights.tolist()
    assert class_weights(Masks(), 4, None, tmp_path / "w.json").tolist() == weights.tolist()  # cached: no mask read


def test_poly_schedule_with_warmup():
    model = torch.nn.Linear(2, 2)
    optim = settings_of("--optimizer", "sgd", "--schedule", "poly", "--warmup-epochs", "1", "--epochs", "3",
                        "--lr", "1.0").optim
    optimizer = build_optimizer(model, optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch=2, budgeted=False)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # linear warm-up over the first epoch
    assert lrs[2:] == pytest.approx([1.0, 0.75 ** 0.9, 0.5 ** 0.9, 0.25 ** 0.9])


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 3, 1))


def decay_of(optimizer):
    """id(parameter) -> the weight decay its optimizer group applies."""
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_no_weight_decay_on_bias_and_batchnorm():
    model = tiny_model()
    optimizer = build_optimizer(model, settings_of("--weight-decay", "5e-4").optim, torch.device("cpu"))
    decay = decay_of(optimizer)
    assert [decay[id(p)] for p in model.parameters()] == [5e-4, 0, 0, 0, 5e-4, 0]  # conv w, b, BN w, b, conv w, b


def one_step(flags, clip_grad=0.0):
    """The model after one train_step with the optimizer the flags build (one fixed batch)."""
    model = tiny_model()
    optimizer = build_optimizer(model, settings_of(*flags).optim, torch.device("cpu"))
    loop = Runtime(torch.device("cpu"), None, False, clip_grad=clip_grad)
    images, labels = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 4, 4).long()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, images, labels, optimizer, scaler, SegmentationLoss(), loop)
    return model


def test_weight_decay_shrinks_kernels_only():
    sgd = ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.1"]
    plain, decayed, start = one_step(sgd), one_step(sgd + ["--weight-decay", "0.5"]), tiny_model()
    for name, value in decayed.state_dict().items():
        if name.endswith("weight") and value.ndim > 1:  # w - lr * (g + wd * w)
            expected = plain.state_dict()[name] - 0.1 * 0.5 * start.state_dict()[name]
            assert torch.allclose(value, expected, atol=1e-6), name
        else:
            assert torch.equal(value, plain.state_dict()[name]), name


def test_clip_grad_bounds_the_step():
    sgd = ["--optimizer", "sgd", "--momentum", "0", "--lr", "1"]
    start = torch.cat([p.flatten() for p in tiny_model().parameters()])

    def step_norm(clip):
        return (torch.cat([p.flatten() for p in one_step(sgd, clip).parameters()]) - start).norm().item()
    assert step_norm(0.0) > 0.1 and step_norm(0.01) == pytest.approx(0.01, rel=1e-3)


def test_init_from_keeps_bilinear_upsamplers_and_zero_scores(tmp_path):
    torch.manual_seed(0)
    coarse = FCN(FCNConfig("fcn32s", "vgg16", 11, fc_width=8))
    with torch.no_grad():  # a trained-looking source: every layer away from its initial value
        for parameter in coarse.parameters():
            parameter.add_(torch.randn_like(parameter))
    path = tmp_path / "fcn32s.pth"
    save_checkpoint({"model": coarse.state_dict(), "config": {"model": coarse.config.to_dict()}}, path)
    fine = FCN(FCNConfig("fcn16s", "vgg16", 11, fc_width=8))
    init_from(fine, str(path), ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT))
    source, target = coarse.state_dict(), fine.state_dict()
    for name in source:
        if not name.startswith("upscore."):  # the 32x upsampler has no place in FCN-16s
            assert torch.equal(target[name], source[name]), name
    assert not fine.score_pool4.weight.any() and not fine.score_pool4.bias.any()
    assert torch.equal(fine.upscore2.weight, bilinear_kernel(11, 11, 4))
    assert torch.equal(fine.upscore.weight, bilinear_kernel(11, 11, 32))


# ---------------------------------------------------------------- every flag reaches the run

def setup(camvid, out, *flags):
    return train.setup(train.parse_args(["--data-root", str(camvid), "--out", str(out), *SMALL_TRAIN, *flags]))


@pytest.fixture(scope="module")
def recipe_run(camvid, tmp_path_factory):
    """train.setup() of the CamVid recipe plus the loss and data flags (4 train images: 2 steps an epoch)."""
    return setup(camvid, tmp_path_factory.mktemp("recipe"), "--recipe", "camvid", "--class-weights", "median-freq",
                 "--ohem", "0.25", "--val-crop", "--cache")


@pytest.fixture(scope="module")
def plain_run(camvid, tmp_path_factory):
    return setup(camvid, tmp_path_factory.mktemp("plain"))


def test_recipe_optimizer_and_schedule_reach_setup(recipe_run, plain_run):
    optimizer = recipe_run.optimizer
    assert isinstance(optimizer, torch.optim.SGD) and isinstance(plain_run.optimizer, torch.optim.Adam)
    assert {(g["initial_lr"], g["momentum"]) for g in optimizer.param_groups} == {(0.01, 0.9)}
    decay = decay_of(optimizer)
    assert all(decay[id(p)] == (5e-4 if p.ndim > 1 else 0) for p in recipe_run.model.parameters())
    assert recipe_run.runtime.clip_grad == 10.0 and plain_run.runtime.clip_grad == 0.0
    factor = recipe_run.scheduler.lr_lambdas[0]  # 300 epochs x 2 steps, 5 warm-up epochs = 10 steps
    assert [factor(step) for step in (0, 4, 9, 10)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert [factor(step) for step in (305, 599)] == pytest.approx([0.5 ** 0.9, (1 / 590) ** 0.9])
    plain = plain_run.scheduler.lr_lambdas[0]  # step decay: x0.5 every 50 epochs of 2 steps
    assert [plain(step) for step in (0, 99, 100, 200)] == [1.0, 1.0, 0.5, 0.25]


def test_recipe_augmentation_reaches_the_train_set(recipe_run, plain_run):
    steps = recipe_run.train_loader.dataset.transform.steps
    assert [type(step) for step in steps] == [transforms.RandomScale, transforms.RandomCrop,
                                              transforms.RandomHorizontalFlip, transforms.ColorJitter]
    assert (steps[0].low, steps[0].high, steps[1].size, steps[3].strength) == (0.5, 2.0, (32, 32), 0.2)
    augmented, plain = recipe_run.train_loader.dataset, plain_run.train_loader.dataset
    draws = [augmented[0, (seed, 1)] for seed in range(4)]
    assert all(not torch.equal(draws[0][0], other[0]) for other in draws[1:])  # every seed its own sample
    assert torch.equal(augmented[0, (2, 1)][0], draws[2][0])  # and the same one again
    image, labels = plain.load(0)
    assert torch.equal(plain[0, (1, 1)][1], labels[16:48, 32:64])  # no flag: the centre crop, always
    assert torch.equal(plain[0, (2, 1)][0], image[:, 16:48, 32:64])


def test_loss_val_crop_and_cache_flags_reach_setup(recipe_run, plain_run, camvid):
    loss = recipe_run.loss_fn
    expected = median_frequency_weights(CamVidDataset(camvid, "train", ClassTable.from_csv(
        cfg.DEFAULT_CLASS_DICT)), 11).clamp(max=10.0)  # --class-weight-cap's default
    assert loss.ohem_fraction == 0.25 and torch.allclose(loss.weight, expected)
    assert plain_run.loss_fn.weight is None and plain_run.loss_fn.ohem_fraction == 0
    assert recipe_run.val_loader.dataset[0][0].shape == (3, 32, 32)  # --val-crop: the training crop
    assert plain_run.val_loader.dataset[0][0].shape == (3, 64, 96)
    cached = recipe_run.train_loader.dataset
    assert cached.cache is not None and plain_run.train_loader.dataset.cache is None
    before = cached.load(1)
    cached.pairs = [(stem, image.with_name("gone.png"), mask) for stem, image, mask in cached.pairs]
    assert all(torch.equal(a, b) for a, b in zip(cached.load(1), before))  # served from memory, no file read
