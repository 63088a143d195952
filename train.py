"""Train FCN-32s/16s/8s on CamVid: `python train.py --help`. The command line only (recipes, flags and their
checks): it turns the flags into engine.settings.Settings, and engine/ trains."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

import cfg
import devices
from cfg import UserError
from dataset import add_label_cache_args, check_data_root, default_label_cache, parse_splits, resolve_class_dict
from engine.budget import parse_duration
from engine.build import setup as build_run
from engine.checkpoints import check_out
from engine.control import TrainingDiverged
from engine.loop import run_to_the_end
from engine.recipes import RECIPE_NOTES, RECIPES
from engine.run import Run
from engine.settings import DataSettings, LossSettings, ModelSettings, OptimSettings, RunSettings, Settings
from fcn import BACKBONES, VARIANTS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train FCN on CamVid.", formatter_class=cfg.HelpFormatter)
    add = parser.add_argument
    add("--data-root", default=cfg.default_data_root(),
        help="CamVid folder: $CAMVID_ROOT when set, else data/CamVid in the working folder")
    add("--class-dict", default=None, help="class_dict.csv (default: DATA_ROOT/class_dict.csv, else data/class_dict.csv)")
    add("--recipe", choices=[*sorted(RECIPES), "auto"],
        help="set the defaults of a documented recipe; explicit flags still win (auto: camvid where the --device is "
             "a CUDA GPU, camvid-cpu elsewhere)")
    add("--model", default="fcn8s", choices=VARIANTS, help="FCN variant: the skips it fuses (docs/model.md)")
    add("--backbone", default="vgg16_bn", choices=list(BACKBONES), help="torchvision classifier under the FCN head")
    add("--fc-width", type=int, default=None,
        help="channels of the convolutionalised hidden layers, fc6/fc7 (default: the classifier's own: VGG 4096, "
             "MobileNetV3 1280; ResNets have none)")
    add("--pretrained", nargs="?", const="imagenet", default=None,
        help="the backbone's ImageNet weights: alone, torchvision's download (weights API); with PATH, the "
             "torchvision classifier's state dict on disk")
    add("--init-from", help="start from another run's checkpoint: every layer whose shape fits (e.g. the fcn32s "
        "best.pth for fcn16s, or a CamVid model for another class set)")
    add("--backbone-lr-mult", type=float, default=1.0, help="lr factor of the backbone's layers (e.g. 0.1 when fine-tuning)")
    add("--epochs", type=int, default=100, help="epochs to train (with --time-budget: the most it may choose)")
    add("--time-budget", metavar="DURATION",
        help="train the best schedule that fits: 90s, 20m, 1.5h or seconds for the whole run; after the first "
             "epoch it plans the last step that fits, plans again as the run goes and anneals the lr (poly) to 0 "
             "at that step (none: no budget, e.g. after --recipe camvid-cpu)")
    add("--batch-size", type=int, default=8, help="per process")
    add("--accum-steps", type=int, default=1, metavar="K",
        help="accumulate the gradients of K batches per optimizer step: --batch-size 2 --accum-steps 4 trains "
             "like batch 8 in a quarter of the activation memory")
    add("--eval-batch-size", type=int, default=8, help="validation batch, per process")
    add("--optimizer", default="adam", choices=("adam", "sgd"), help="biases and BatchNorm get no weight decay")
    add("--lr", type=float, default=1e-4, help="base learning rate")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--weight-decay", type=float, default=0.0, help="weight decay (not on biases and BatchNorm)")
    add("--schedule", default="step", choices=("step", "poly"),
        help="step: x --gamma every --step-size epochs; poly: polynomial decay to 0")
    add("--step-size", type=int, default=50, help="epochs between step decays")
    add("--gamma", type=float, default=0.5, help="step decay factor")
    add("--warmup-epochs", type=int, default=0, help="linear learning-rate warm-up before the schedule")
    add("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    add("--class-weights", default="none", choices=("none", "median-freq"),
        help="median-freq: SegNet's median-frequency balancing, from the training masks, capped at --class-weight-cap")
    add("--class-weight-cap", type=float, default=10.0,
        help="largest class weight of --class-weights median-freq (0: uncapped), so a class of a few pixels cannot "
             "dominate the loss")
    add("--class-weight-power", type=float, default=1.0,
        help="raise the median-frequency weights to this power before the cap: 1 is SegNet's balancing, 0.5 its "
             "square root (milder: common classes keep more weight, rare ones get less), 0 no balancing")
    add("--aux-weight", type=float, default=0.0,
        help="deep supervision: add this weight x the loss of each coarser output (FCN-8s: the stride-32 and "
             "stride-16 scores, upsampled) to the training loss; inference unchanged (0: off)")
    add("--ema", type=float, default=0.0, metavar="DECAY",
        help="validate and save as best.pth an exponential moving average of the weights and BatchNorm "
             "statistics, e.g. 0.999 (0: off); last.pth keeps both")
    add("--ohem", type=float, default=0.0, help="keep only this fraction of hardest pixels in the loss (0: off)")
    add("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="random scale augmentation range")
    add("--random-crop", action=argparse.BooleanOptionalAction, default=False,
        help="random instead of centre crop (implied by --scale)")
    add("--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flip")
    add("--jitter", type=float, default=0.0, help="photometric jitter strength (0: off)")
    add("--crop-size", type=int, nargs=2, default=list(cfg.CROP_SIZE), metavar=("H", "W"),
        help="training crop (multiples of 32 keep every pooling exact)")
    add("--val-crop", action="store_true", help="validate on the centre crop instead of the full image")
    add("--downscale", type=float, default=1.0,
        help="shrink train and val images by this factor first (4: quarter resolution, as --recipe camvid-cpu); "
             "test.py and predict.py read it from the checkpoint")
    add("--test-scale", type=float, default=1.0, metavar="FACTOR",
        help="run the model at FACTOR x its training scale in validation, test.py, predict.py and exports (the "
             "checkpoint records it): random scaling (--scale 0.5 2) shows it objects at 1.25x their size on "
             "average; 1.25 in --recipe camvid-cpu, chosen on val (docs/results.md)")
    add("--limit", type=int, help="use only the first K images (by stem) of each split")
    add("--train-splits", default="train",
        help="the splits to train on, e.g. train,val (as the published test scores do); val is validated anyway")
    add("--best", default="auto", choices=("auto", "val", "last"),
        help="what best.pth holds: val, the epoch with the best val MIoU; last, the latest epoch; auto: last when "
             "--train-splits includes val, else val")
    add("--out", type=Path,
        help="run folder (default: weights/<recipe>, else weights/<model>); a new run never writes into a folder "
             "that holds another run")
    add("--resume", action="store_true", help="continue from RUN_DIR/last.pth")
    add("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu or cuda")
    add("--seed", type=int, default=0, help="seed of data order, augmentation and dropout")
    add("--workers", type=int, default=devices.default_workers(),
        help="data loader processes: cores - 2 (the main process and its pin-memory thread keep two), at most 8")
    add("--cache", action=argparse.BooleanOptionalAction, default=False,
        help="decode the splits once into memory")
    add_label_cache_args(parser)
    add("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="mixed precision: bf16 (fp16 on GPUs without bf16) on CUDA, bf16 on CPUs with native bf16; the loss "
             "stays fp32")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="NHWC memory format (faster convolutions on CUDA and in oneDNN on CPUs)")
    add("--fused", action=argparse.BooleanOptionalAction, default=True, help="fused optimizer kernels (CUDA and CPU)")
    add("--compile", nargs="?", const="inductor", metavar="BACKEND",
        help="torch.compile the training model (alone: the inductor backend)")
    add("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True, help="cuDNN autotuning on CUDA")
    add("--pin-memory", action=argparse.BooleanOptionalAction, default=True,
        help="page-locked batches for asynchronous host-to-GPU copies")
    add("--log-every", type=int, default=10, help="steps between progress updates (host syncs)")
    add("--eval-every", type=eval_cadence, default=1, metavar="N|auto",
        help="validate every N epochs (the last always, and the first under --time-budget); auto: as often as keeps "
             "validation under 4 %% of the run, from its measured cost")
    add("--sync-bn", action="store_true",
        help="SyncBatchNorm under torchrun on CUDA: batch statistics over every process (a host sync per BN layer)")
    add("--tensorboard", action="store_true",
        help="log losses, lr, val metrics and samples per epoch for TensorBoard, in the run folder")
    add("--save-every", type=float, default=300.0, metavar="SECONDS",
        help="write last.pth, best.pth and the plots at most this often (0: every epoch); always at the end "
             "and on a stop signal")
    return parser


def eval_cadence(text: str) -> int | str:
    """--eval-every: a number of epochs, or auto."""
    return "auto" if text.strip().lower() == "auto" else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse twice so a --recipe supplies defaults that explicit flags override."""
    parser = get_args_parser()
    options = vars(parser.parse_args([]))
    for name, recipe in RECIPES.items():  # set_defaults would accept a misspelt key and change nothing
        unknown = sorted(set(recipe) - set(options))
        if unknown:
            raise ValueError(f"RECIPES['{name}']: {', '.join(unknown)} is not a train.py option")
    args = parser.parse_args(argv)
    recipe = args.recipe
    if recipe == "auto":
        recipe = machine_recipe(args.device)
        print(f"--recipe auto: {recipe}, {RECIPE_NOTES[recipe]}")
    if recipe:
        parser.set_defaults(**RECIPES[recipe])
        args = parser.parse_args(argv)
        args.recipe = recipe
    return args


def machine_recipe(device: str) -> str:
    """The recipe that suits the --device: the full one on a CUDA GPU, the CPU one elsewhere."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "camvid" if cuda else "camvid-cpu"


def check_args(args: argparse.Namespace) -> None:
    """Bad flags become one clear line."""
    for flag in ("epochs", "batch_size", "accum_steps", "eval_batch_size", "fc_width", "log_every", "step_size",
                 "eval_every"):
        if getattr(args, flag) not in (None, "auto") and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit: expected a positive integer, got {args.limit}")
    if args.lr <= 0:
        raise UserError(f"--lr: expected a positive number, got {args.lr}")
    if not 0 <= args.ohem < 1:
        raise UserError(f"--ohem: expected a fraction in [0, 1), got {args.ohem}")
    check_levers(args)
    if args.scale and not 0 < args.scale[0] <= args.scale[1]:
        raise UserError(f"--scale: expected 0 < MIN <= MAX, got {args.scale}")
    if min(args.crop_size) < cfg.MIN_INPUT_SIDE:
        raise UserError(f"--crop-size: expected at least {cfg.MIN_INPUT_SIDE} each side, got {args.crop_size}")
    if args.downscale <= 0:
        raise UserError(f"--downscale: expected a positive factor, got {args.downscale}")
    if not 0 < args.test_scale <= 8:
        raise UserError(f"--test-scale: expected a factor in (0, 8], got {args.test_scale}")
    if args.workers < 0:
        raise UserError(f"--workers: expected >= 0, got {args.workers}")
    if args.time_budget is not None and args.time_budget.strip().lower() == "none":
        args.time_budget = None
    if args.time_budget is not None:
        parse_duration(args.time_budget)
        if args.epochs < 2:
            raise UserError(f"--time-budget needs --epochs of at least 2 (the measured epoch and one more), "
                            f"got {args.epochs}")
        if args.schedule == "step":
            raise UserError("--time-budget needs --schedule poly: a step decay cannot anneal to a deadline")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # TensorBoard is an optional install
        except ImportError:
            raise UserError("--tensorboard needs TensorBoard: pip install tensorboard") from None
    if args.save_every < 0:
        raise UserError(f"--save-every: expected seconds >= 0 (0: every epoch), got {args.save_every}")
    check_data_root(args.data_root)


def check_levers(args: argparse.Namespace) -> None:
    """The accuracy options: an EMA decay in [0, 1), deep supervision of a variant with coarser outputs, a
    weight cap >= 0, and well-formed splits (find_split_pairs checks that they exist)."""
    if not 0 <= args.ema < 1:
        raise UserError(f"--ema: expected a decay in [0, 1) such as 0.999 (0: off), got {args.ema}")
    if args.aux_weight < 0:
        raise UserError(f"--aux-weight: expected a weight >= 0, got {args.aux_weight}")
    if args.aux_weight > 0 and args.model == "fcn32s":
        raise UserError("--aux-weight: fcn32s has no coarser output to supervise; use fcn16s or fcn8s")
    if args.class_weight_cap < 0:
        raise UserError(f"--class-weight-cap: expected a weight > 0 (0: uncapped), got {args.class_weight_cap}")
    if args.class_weight_power < 0:
        raise UserError(f"--class-weight-power: expected a power >= 0 such as 0.5, got {args.class_weight_power}")
    parse_splits(args.train_splits)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The checked flags as typed settings, the run folder and class table resolved; `flags` keeps them by name,
    as checkpoints record them."""
    args.out = args.out or Path("weights") / (args.recipe or args.model)
    args.class_dict = resolve_class_dict(args.data_root, args.class_dict)
    data = DataSettings(
        Path(args.data_root), Path(args.class_dict), parse_splits(args.train_splits), args.limit,
        tuple(args.crop_size), tuple(args.scale) if args.scale else None, args.random_crop, args.flip, args.jitter,
        args.val_crop, args.downscale, args.batch_size, args.eval_batch_size, args.workers, args.cache,
        args.pin_memory, None if args.no_label_cache else Path(args.label_cache or default_label_cache()),
        args.test_scale)
    model = ModelSettings(args.model, args.backbone, args.fc_width, args.pretrained, args.init_from,
                          args.channels_last, args.compile, args.sync_bn, args.cudnn_benchmark)
    optim = OptimSettings(args.optimizer, args.lr, args.momentum, args.weight_decay, args.backbone_lr_mult,
                          args.schedule, args.epochs, args.step_size, args.gamma, args.warmup_epochs, args.clip_grad,
                          args.accum_steps, args.fused)
    loss = LossSettings(args.class_weights, args.class_weight_cap or None, args.class_weight_power, args.ohem,
                        args.aux_weight)
    run = RunSettings(args.out, args.resume, args.device, args.amp, args.seed,
                      parse_duration(args.time_budget) if args.time_budget else None,
                      None if args.eval_every == "auto" else args.eval_every,
                      args.save_every, args.log_every, args.ema, args.best, args.tensorboard, args.recipe)
    flags = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}
    return Settings(data, model, optim, loss, run, flags, "python train.py " + " ".join(sys.argv[1:]))


def setup(args: argparse.Namespace) -> Run:
    """Check the flags, resolve the run folder and class table, and build the run they describe."""
    check_args(args)
    settings = settings_from_args(args)
    check_out(settings.run.out, settings.run.resume)  # on every rank, before any of them writes
    return build_run(settings)


def main(args: argparse.Namespace) -> None:
    run_to_the_end(setup(args))


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as error:
        cfg.fail(str(error))
    except TrainingDiverged as error:
        cfg.fail(f"{error}; the last good checkpoints are kept (lower --lr or set --clip-grad)", code=1)
