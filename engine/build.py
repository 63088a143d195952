"""Building a run's pieces from its settings: the model (fresh, pretrained, from another run or resumed), its
placement and wrappers (SyncBatchNorm, DDP, torch.compile), the optimizer, the data loaders and the loss."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import devices
import inference
from cfg import UserError
from dataset import CamVidDataset, ClassTable, LabelCache, SeededSampler, ShardSampler
from engine.budget import Budget
from engine.checkpoints import Folder, load_checkpoint, load_resume
from engine.ema import WeightAverage
from engine.loss import SegmentationLoss, class_weights
from engine.run import EpochProgress, EvalCadence, Run, Runtime
from engine.schedule import build_scheduler
from engine.settings import DataSettings, LossSettings, ModelSettings, OptimSettings, Settings
from fcn import FCN, FCNConfig, check_pretrainable, load_pretrained, upgrade_state_dict
from transforms import Compose, eval_transform, train_transform


def parameter_groups(model: nn.Module, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
    """Weight decay on conv/linear kernels only (biases and BatchNorm parameters are left alone); with
    backbone_lr_mult != 1 the backbone's features get groups of their own whose "lr_mult" scales the lr."""
    split = backbone_lr_mult != 1.0
    groups = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            backbone = split and name.startswith("backbone.")
            groups.setdefault((backbone, parameter.ndim > 1), []).append(parameter)
    result = []
    # Head groups first: param_groups[0] keeps the base lr, the one history.csv logs
    for backbone, decay in [(False, True), (False, False), (True, True), (True, False)]:
        if (backbone, decay) in groups:
            group = {"params": groups[backbone, decay], "weight_decay": weight_decay if decay else 0.0}
            result.append({**group, "lr_mult": backbone_lr_mult} if backbone else group)
    return result


# One kernel per step over all parameters: on a 2-core CPU, Adam on a 15 M-parameter FCN steps 4x faster fused
FUSED_DEVICES = ("cuda", "cpu")


def build_optimizer(model: nn.Module, optim: OptimSettings, device: torch.device) -> torch.optim.Optimizer:
    """Adam or SGD(momentum), fused kernels on CUDA and CPU; the backbone's groups start at lr × --backbone-lr-mult."""
    if optim.backbone_lr_mult < 0:
        raise UserError(f"--backbone-lr-mult: expected a factor >= 0, got {optim.backbone_lr_mult}")
    groups = parameter_groups(model, optim.weight_decay, optim.backbone_lr_mult)
    for group in groups:  # LambdaLR scales each group's own initial lr, so the schedule applies to both
        group["lr"] = optim.lr * group.pop("lr_mult", 1.0)
    fused = {"fused": True} if device.type in FUSED_DEVICES and optim.fused else {}
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, **fused)
    return torch.optim.Adam(groups, lr=optim.lr, **fused)


def build_loaders(data: DataSettings, table: ClassTable, device: torch.device, dist: devices.DistInfo,
                  seed: int) -> tuple[DataLoader, DataLoader]:
    """Train loader (seeded per-epoch shuffle, sharded across ranks) and val loader (each sample once)."""
    augment = augmentation(data)
    # Made in the main process, so the workers inherit its state
    labels = LabelCache(data.label_cache) if data.label_cache is not None else None
    train_set = CamVidDataset(data.root, data.train_splits, table, augment, data.limit, label_cache=labels)
    val_crop = eval_transform(tuple(data.crop_size) if data.val_crop else None, data.downscale)
    val_set = CamVidDataset(data.root, "val", table, val_crop, data.limit, label_cache=labels)
    if data.cache:
        train_set.preload()
        val_set.preload()
    common = dict(num_workers=data.workers, pin_memory=data.pin_memory and device.type == "cuda",
                  persistent_workers=data.workers > 0, worker_init_fn=devices.ignore_stop_signals)
    train_sampler = SeededSampler(train_set, dist.world_size, dist.rank, shuffle=True, seed=seed)
    train_loader = DataLoader(train_set, data.batch_size, sampler=train_sampler, **common)
    val_sampler = ShardSampler(len(val_set), dist.world_size, dist.rank)
    val_loader = DataLoader(val_set, data.eval_batch_size, sampler=val_sampler, **common)
    return train_loader, val_loader


def augmentation(data: DataSettings) -> Compose:
    """The training transform the data settings describe (crop, random scale, flip, jitter, downscale)."""
    return train_transform(tuple(data.crop_size), data.scale, data.random_crop, data.flip, data.jitter,
                           data.downscale)


def build_model(settings: ModelSettings, table: ClassTable, resumed: dict | None, source: Path) -> FCN:
    """A fresh model from the settings (plus --pretrained / --init-from), or the resumed checkpoint's (`source`)."""
    if resumed is not None:
        return inference.model_from_checkpoint(resumed, table, source)
    config = FCNConfig(settings.variant, settings.backbone, table.num_classes, settings.fc_width)
    if settings.pretrained:
        check_pretrainable(config)  # before building a large model or downloading anything
    model = FCN(config)
    if settings.pretrained:
        load_pretrained(model, settings.pretrained)
    if settings.init_from:
        init_from(model, settings.init_from, table)
    return model


def init_from(model: FCN, path: str, table: ClassTable) -> None:
    """Load every layer of a checkpoint whose tensors all fit (another variant or class set); the rest keeps
    its fresh initialisation (zero scoring layers, bilinear upsamplers). One line names what was not loaded."""
    state = load_checkpoint(path)
    source, target = upgrade_state_dict(state["model"]), model.state_dict()
    layers: dict[str, list[str]] = {}
    for key in target:
        layers.setdefault(key.rsplit(".", 1)[0], []).append(key)
    # All of a layer's tensors or none: never a loaded bias on a fresh kernel
    fits = {layer: all(k in source and source[k].shape == target[k].shape for k in keys)
            for layer, keys in layers.items()}
    if not any(ok for layer, ok in fits.items() if layer.startswith("backbone.")):
        raise UserError(f"--init-from {path}: no backbone layer fits this model (another backbone?)")
    model.load_state_dict({k: source[k] for layer, keys in layers.items() if fits[layer] for k in keys},
                          strict=False)
    skipped = [layer for layer, ok in fits.items() if not ok]
    classes = state["config"].get("model", {}).get("num_classes", "?")
    print(f"--init-from {path} ({classes} classes -> {table.num_classes}): "
          + (f"not loaded, freshly initialised: {', '.join(skipped)}" if skipped else "every layer loaded"))


def place_model(model: FCN, settings: ModelSettings, device: torch.device, dist: devices.DistInfo) -> FCN:
    """SyncBatchNorm under torchrun with --sync-bn, then the device and memory format."""
    if settings.sync_bn and dist.enabled:
        # Off by default, as in torchvision's references: under NCCL every SyncBatchNorm layer copies a count
        # to the host, a sync per BN layer and forward. Without it each rank normalises with its own batch and
        # rank 0's running statistics are used (DDP's broadcast_buffers, and sync_buffers before validation).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark  # fixed train size: pick the fastest kernels once
    layout = torch.channels_last if settings.channels_last else torch.contiguous_format
    return model.to(device, memory_format=layout)


def build_loss(settings: LossSettings, train_set: CamVidDataset, num_classes: int, device: torch.device,
               out: Path) -> SegmentationLoss:
    """The training loss, with capped median-frequency class weights (recorded in the run folder `out`) when
    asked for."""
    weight = None
    if settings.class_weights == "median-freq":
        out.mkdir(parents=True, exist_ok=True)
        weight = class_weights(train_set, num_classes, settings.class_weight_cap, out / "class_weights.json",
                               settings.class_weight_power)
    return SegmentationLoss(weight, settings.ohem).to(device)


def wrap_model(model: FCN, settings: ModelSettings, device: torch.device, dist: devices.DistInfo) -> nn.Module:
    """DDP under torchrun, then torch.compile: compiling the DDP module lets dynamo split the graph at
    DDP's gradient buckets, so the all-reduce still overlaps the backward pass."""
    if dist.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        **buffer_sync(settings.sync_bn))
    return torch.compile(model, backend=settings.compile) if settings.compile else model


def buffer_sync(sync_bn: bool) -> dict:
    """DDP's options for the BatchNorm buffers: SyncBatchNorm keeps every rank's equal, so no broadcast at each
    forward (torch 2.14 names the switch forward_sync_buffers, older versions broadcast_buffers)."""
    if not sync_bn:
        return {}
    names = inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


OPTIMIZER_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how to step, not what was learnt


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load saved optimiser state but keep this run's kernel flags (a CPU checkpoint resumes fused on CUDA,
    a CUDA one unfused on CPU), and store each state tensor in its parameter's memory format: fused
    kernels need matching strides, and --channels-last may differ from the saved run."""
    groups = [{**saved, **{k: current[k] for k in OPTIMIZER_FLAGS if k in current}}
              for saved, current in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for parameter, values in optimizer.state.items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.shape == parameter.shape:
                values[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def setup(settings: Settings) -> Run:
    """Wire data, model, optimiser, schedule and (on --resume) the saved state into one Run."""
    run_settings, data = settings.run, settings.data
    device = devices.resolve_device(run_settings.device)
    if settings.model.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn: SyncBatchNorm runs on CUDA GPUs only (DDP rejects it on the CPU)")
    dist_info, device = devices.init_distributed(device)
    if dist_info.is_main and data.val_trained_on:
        print(held_out_line(settings))
    runtime = Runtime(device, devices.amp_dtype(device, run_settings.amp), settings.model.channels_last, dist_info,
                      log_every=run_settings.log_every, clip_grad=settings.optim.clip_grad, seed=run_settings.seed,
                      compile=bool(settings.model.compile), accum_steps=settings.optim.accum_steps,
                      aux_weight=settings.loss.aux_weight)
    torch.manual_seed(run_settings.seed)
    table = ClassTable.from_csv(data.class_dict)
    last = run_settings.out / "last.pth"
    resumed = load_resume(run_settings.out, settings, dist_info.world_size) if run_settings.resume else None
    model = place_model(build_model(settings.model, table, resumed, last), settings.model, device, dist_info)
    if run_settings.ema:  # of the placed model: the average pairs its tensors with the trained ones
        runtime.average = WeightAverage(model, run_settings.ema)
    train_loader, val_loader = build_loaders(data, table, device, dist_info, run_settings.seed)
    optimizer = build_optimizer(model, settings.optim, device)
    steps_per_epoch = math.ceil(len(train_loader) / settings.optim.accum_steps)
    scheduler = build_scheduler(optimizer, settings.optim, steps_per_epoch, run_settings.time_budget is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp == torch.float16)
    loss_fn = build_loss(settings.loss, train_loader.dataset, table.num_classes, device, run_settings.out)
    folder = Folder(run_settings.out, dist_info.is_main, run_settings.save_every)
    run = Run(settings, table, model, optimizer, scheduler, scaler, loss_fn, train_loader, val_loader, runtime, folder)
    run.cadence = EvalCadence(run_settings.eval_every or 1, auto=run_settings.eval_every is None)
    if run_settings.time_budget is not None:
        runtime.budget = Budget.start(run_settings.time_budget, steps_per_epoch,
                                      settings.optim.epochs * steps_per_epoch, run.cadence.every,
                                      run_settings.save_every, resumed.get("budget") if resumed is not None else None)
    if resumed is not None:
        restore(run, resumed)
    run.model = wrap_model(model, settings.model, device, dist_info)
    return run


def held_out_line(settings: Settings) -> str:
    """What a run that trains on val says once: its val scores are not held out, and what best.pth holds."""
    splits = ",".join(settings.data.train_splits)
    return (f"--train-splits {splits}: val is trained on, so its scores are not held out (they are still computed, "
            "for the curves); best.pth is " + ("the last epoch" if settings.keep_last
                                                else "the best val epoch (--best val)"))


def restore(run: Run, state: dict) -> None:
    """Load optimiser, schedule, scaler, weight average and progress from a checkpoint. A schedule a budget
    planned, and any schedule a budget takes over now, continue from the saved step at the saved rate; a plain
    run's follows this run's --epochs and --warmup-epochs."""
    load_optimizer_state(run.optimizer, state["optimizer"])
    fresh = dict(vars(run.schedule))
    run.scheduler.load_state_dict(state["scheduler"])  # a saved Schedule's fields come back with it
    planned = state.get("budget") is not None and run.schedule.total is not None
    if run.runtime.budget is None and not planned:
        vars(run.schedule).update(fresh)
    if state["scaler"]:  # empty when saved by a disabled scaler (CPU, bf16): an fp16 run starts a fresh scale
        run.scaler.load_state_dict(state["scaler"])
    if run.runtime.average is not None and state.get("ema"):  # else (--ema added on resume) it starts from here
        run.runtime.average.load_state_dict(state["ema"])
    run.start_epoch = state["epoch"] + 1
    run.best_miou, run.history = state["best_miou"], list(state["history"])
    run.progress = EpochProgress.from_dict(state["partial_epoch"])
    if not run.is_main:  # the saved partial loss is the sum over every rank: rank 0 carries it
        run.progress.loss_sum, run.progress.count = 0.0, 0
    run.folder.checkpointed = True
