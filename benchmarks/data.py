"""The data pipeline's throughput: loader img/s and CPU-seconds per image of the train, recipe and eval transforms."""
from __future__ import annotations

import functools
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from benchmarks.plan import DATA_BATCH, RECIPE, Plan
from dataset import CamVidDataset, ClassTable, LabelCache, SeededSampler
from engine.build import augmentation
from engine.recipes import RECIPES
from engine.settings import DataSettings
from transforms import Compose, eval_transform, train_transform


def remember_pid(slot, worker_id: int) -> None:
    """worker_init_fn: publish the worker's pid so the parent can read its CPU time."""
    slot.value = os.getpid()


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds of a process from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_rate(dataset: CamVidDataset, sampler: Sampler | None, epochs: int, pin: bool) -> tuple[float, float | None]:
    """Median images/s of one worker process over `epochs` passes (file to collated uint8 batch), by the
    wall clock and per CPU-second of the worker (the latter barely moves when other jobs share the cores)."""
    pid = multiprocessing.Value("i", 0)
    loader = DataLoader(dataset, DATA_BATCH, sampler=sampler, num_workers=1, pin_memory=pin,
                        persistent_workers=True, worker_init_fn=functools.partial(remember_pid, pid))
    wall, cpu = [], []
    for epoch in range(epochs + 1):  # pass 0 starts the worker and fills the page cache
        if isinstance(sampler, SeededSampler):
            sampler.set_epoch(epoch)
        start, start_cpu = time.perf_counter(), cpu_seconds(pid.value)
        count = sum(len(images) for images, _ in loader)
        end_cpu = cpu_seconds(pid.value)
        if epoch > 0:
            wall.append(count / (time.perf_counter() - start))
            if start_cpu is not None and end_cpu is not None and end_cpu > start_cpu:
                cpu.append(count / (end_cpu - start_cpu))
    return statistics.median(wall), statistics.median(cpu) if cpu else None


def recipe_transform(recipe: str = RECIPE) -> Compose:
    """The train augmentation of `train.py --recipe RECIPE`, built as engine.build.build_loaders builds it (the
    recipe's data settings over train.py's defaults)."""
    fields = DataSettings.__dataclass_fields__
    return augmentation(DataSettings(Path("."), Path("."), **{k: v for k, v in RECIPES[recipe].items() if k in fields}))


def measure_data(root: str, table: ClassTable, plan: Plan, device: torch.device, labels: LabelCache | None) -> dict:
    """Loader throughput of the centre-crop train transform and of the recipe's augmentation (seeded
    sampler, as train.py), of the eval transform, and of the centre crop without the label cache (every
    mask decoded and hash-encoded, as in a first epoch)."""
    pin = device.type == "cuda"
    train_set = CamVidDataset(root, "train", table, train_transform(), label_cache=labels)
    recipe_set = CamVidDataset(root, "train", table, recipe_transform(), label_cache=labels)
    uncached = CamVidDataset(root, "train", table, train_transform())
    val_set = CamVidDataset(root, "val", table, eval_transform(), label_cache=labels)
    result = {}
    for name, dataset, sampler in (("train", train_set, SeededSampler(train_set)),
                                   ("recipe", recipe_set, SeededSampler(recipe_set)), ("eval", val_set, None),
                                   ("train_nocache", uncached, SeededSampler(uncached))):
        result[f"data_{name}_img_s"], result[f"data_{name}_cpu_img_s"] = loader_rate(dataset, sampler,
                                                                                   plan.data_epochs, pin)
    return result
