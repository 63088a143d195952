"""What bench.py runs: a plan of sizes and repetitions per device, and the two ways of running the model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import cfg

DATA_BATCH = 8  # the train loader's default batch


MATMUL_SIDE = 8192  # bf16 n×n matmuls that define the measured peak for MFU


MATMUL_WARMUP_S = 0.2  # clocks and cuBLAS heuristics settle within this; 3 calls of 1 ms do not


RECIPE = "camvid"  # the RECIPES entry whose augmentation data_recipe_img_s measures


DATA_HEADROOM = 2  # workers_needed keeps the loaders this many times ahead of the fast train step


# Vendor dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, matched against
# torch.cuda.get_device_name (upper-cased): the first entry whose words all occur wins. Sources: the
# Hopper whitepaper (H100 SXM5 989.4, H100 PCIe 756); NVIDIA's datasheets quote bf16 with sparsity,
# halved here: H100 NVL and H200 NVL 1,671 -> 835.5, H200 and GH200 1,979 -> the SXM5's 989.4; A100
# 312 (SXM4 and PCIe alike). "NVIDIA H100 80GB HBM3" is the SXM5 board; a bare "H100" is left unknown.
SPEC_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.5),
    (("H100", "HBM3"), 989.4),
    (("H100", "SXM"), 989.4),
    (("H200", "NVL"), 835.5),
    (("H200",), 989.4),
    (("A100",), 312.0),
)


@dataclass
class Plan:
    """Sizes, batches and repetition counts of one run."""

    train_size: tuple[int, int]
    train_batch: int
    infer_size: tuple[int, int]
    infer_batch: int
    fc_width: int
    warmup: int  # untimed calls before the timed blocks
    steps: int  # calls per timed block
    repeats: int  # timed blocks per mode; medians are reported
    data_epochs: int  # timed passes over each split (after one warm-up pass)


# Full size on CUDA; on a CPU the train step runs at half size with a narrower fc6/fc7 so the whole
# bench ends in a few minutes; --quick is a seconds-long smoke run.
PLANS = {
    "cuda": Plan(cfg.CROP_SIZE, 8, cfg.EVAL_SIZE, 8, 4096, warmup=5, steps=20, repeats=5, data_epochs=3),
    "cpu": Plan((176, 240), 2, cfg.EVAL_SIZE, 2, 1024, warmup=1, steps=1, repeats=5, data_epochs=3),
    "quick": Plan((32, 64), 1, (32, 64), 1, 32, warmup=1, steps=1, repeats=1, data_epochs=1),
}


@dataclass
class Mode:
    """One way of running the model: plain eager fp32, or the project's fast path."""

    name: str
    amp: torch.dtype | None = None
    channels_last: bool = False
    fused: bool = False
    cudnn_benchmark: bool = False
    compile: bool = False

    def describe(self) -> str:
        """e.g. 'bfloat16 + channels_last + fused + cudnn_benchmark'."""
        dtype = str(self.amp).replace("torch.", "") if self.amp else "fp32"
        flags = [dtype, "channels_last" if self.channels_last else "contiguous"]
        flags += [name for name in ("fused", "cudnn_benchmark", "compile") if getattr(self, name)]
        return " + ".join(flags)
