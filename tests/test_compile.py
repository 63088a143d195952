"""--compile alone and under torchrun: unwrap() finds the FCN inside any nesting of DDP and torch.compile,
and a 2-process gloo run trains 2 epochs without recompiling for the smaller last batch."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_dist as fx  # noqa: E402

from devices import unwrap
from fcn import FCN, FCNConfig  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture
def process_group(tmp_path: Path):
    """A one-process gloo group, so DDP can wrap a CPU module in-process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_unwrap_strips_ddp_and_compile_in_any_order(process_group):
    model = FCN(FCNConfig("fcn32s", "vgg16", 11, fc_width=8))
    wrappings = {
        "compile(DDP)": torch.compile(DistributedDataParallel(model)),  # what train.py builds under torchrun
        "DDP(compile)": DistributedDataParallel(torch.compile(model)),
        "compile": torch.compile(model),
        "DDP": DistributedDataParallel(model),
        "none": model,
    }
    for name, wrapped in wrappings.items():
        assert unwrap(wrapped) is model, name
        assert unwrap(wrapped).config.num_classes == 11, name


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun's standalone rendezvous")
def test_compile_under_torchrun_trains_without_recompiling(tmp_path: Path, monkeypatch):
    """10 images over 2 ranks with batch 3: each rank steps on 3 then 2 images, so an input shape that
    is not dynamic in the batch would recompile at the second step (TORCH_LOGS prints every recompile).
    Under a time budget every rank takes rank 0's plan (one all-reduce), and rank 0 alone announces it.
    The aot_eager backend runs dynamo's tracing, DDP graph splitting and guards, but no C++ compiler:
    the inductor default costs minutes of CPU here."""
    data = fx.write_camvid(tmp_path / "CamVid", {"train": 10, "val": 3})
    out = tmp_path / "run"
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    result = fx.run([*TORCHRUN, *fx.train_args(data, out, "--epochs", "2", "--batch-size", "3",
                                               "--compile", "aot_eager", "--time-budget", "10m", "--schedule", "poly")])
    assert "Recompiling" not in result.stderr, result.stderr[-3000:]
    assert re.search(r"epoch 2/2: +100%\|[^|]*\| *2/2 ", result.stderr), result.stderr[-3000:]
    assert result.stdout.count("epoch 2/2: train_loss") == 1, result.stdout
    assert result.stdout.count("time budget 10m: 2 epochs (4 steps") == 1, result.stdout
    checkpoint = fx.load(out / "last.pth")  # saved at the end of epoch 2: unwrap gave the FCN's config
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["train"]["compile"] == "aot_eager"
    assert checkpoint["budget"]["total"] == 4 and checkpoint["scheduler"]["last_epoch"] == 4
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in checkpoint["model"])
