"""DistributedDataParallel on the CPU: 2 gloo processes through torchrun (`python -m torch.distributed.run`),
plus the samplers that shard training and validation across ranks."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_dist as fx  # noqa: E402
from conftest import reactive_checkpoint, settings_of  # noqa: E402

import devices  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402
from cfg import UserError  # noqa: E402
from dataset import CamVidDataset, ClassTable, SeededSampler, ShardSampler  # noqa: E402
from engine.build import buffer_sync, place_model
from engine.loop import evaluate
from engine.run import Runtime
from fcn import FCN, FCNConfig  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 train images (one batch of 2 per rank) and 3 val images: an odd count, so an evaluation that
    padded the shards the way DistributedSampler does would count one image twice."""
    return fx.write_camvid(tmp_path_factory.mktemp("dist") / "CamVid", {"train": 4, "val": 3, "test": 2})


def reactive_start(path: Path) -> Path:
    """A narrow FCN-8s on VGG16-BN with random (not zero) scoring layers, for --init-from: its val loss then
    depends on the BatchNorm running statistics, so a rank validating with statistics other than rank 0's shows."""
    reactive_checkpoint(path, "vgg16_bn", fc_width=16)
    return path


def test_two_gloo_processes_match_a_single_process_evaluation(data: Path, tmp_path: Path):
    out = tmp_path / "run"
    start = reactive_start(tmp_path / "start.pth")
    result = fx.run([*TORCHRUN, *fx.train_args(data, out, "--epochs", "1", "--backbone", "vgg16_bn",
                                               "--init-from", str(start), "--no-amp")])  # compared in fp32
    # --batch-size is per process: 4 images = 2 ranks x 1 step of 2
    assert re.search(r"epoch 1/1: +100%\|[^|]*\| *1/1 ", result.stderr), result.stderr
    # rank 0 alone logs, plots and checkpoints
    assert result.stdout.count("epoch 1/1: train_loss") == 1, result.stdout
    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "last.pth"]
    assert not list(out.glob(".*"))  # no temporaries of interrupted or concurrent writes
    assert (out / "curves.png").is_file() and (out / "val_samples.png").is_file()
    rows = fx.read_history(out / "history.csv")
    assert [row["epoch"] for row in rows] == ["1"]
    checkpoint = fx.load(out / "last.pth")
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["model"]["backbone"] == "vgg16_bn"
    assert not any("module." in key for key in checkpoint["model"])  # saved unwrapped from DDP
    # The val split sharded 2/1 over the ranks, the confusion matrix and loss all-reduced, every rank on rank 0's
    # BatchNorm statistics: the same numbers as one process scoring the saved model.
    table = ClassTable.from_csv(data / "class_dict.csv")
    model = inference.model_from_checkpoint(checkpoint, table, out / "last.pth")
    loader = torch.utils.data.DataLoader(CamVidDataset(data, "val", table), batch_size=2)
    single = evaluate(model, loader, table.num_classes, Runtime(torch.device("cpu"), None, False))
    assert float(rows[-1]["val_loss"]) == pytest.approx(single["loss"], rel=1e-6)
    assert float(rows[-1]["val_miou"]) == pytest.approx(single["miou"], abs=1e-6)
    assert float(rows[-1]["val_pa"]) == pytest.approx(single["pixel_accuracy"], abs=1e-6)


@pytest.mark.parametrize("length", range(8))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_validation_shards_cover_every_sample_exactly_once(length: int, world: int):
    shards = [list(ShardSampler(length, world, rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardSampler(length, world, rank)) for rank in range(world)] == [len(s) for s in shards]


class Sized(torch.utils.data.Dataset):
    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length


def test_training_sampler_shards_and_reshuffles_every_epoch():
    dataset = Sized(10)
    ranks = [SeededSampler(dataset, 2, rank, seed=3) for rank in range(2)]
    orders = {}
    for epoch in (1, 2):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shards = [[index for index, _ in sampler] for sampler in ranks]
        assert sorted(shards[0] + shards[1]) == list(range(10))  # disjoint halves of one permutation
        assert all(key == (3, epoch) for sampler in ranks for _, key in sampler)  # augmentation key
        orders[epoch] = shards
    assert orders[1] != orders[2]
    again = SeededSampler(dataset, 2, 0, seed=3)
    again.set_epoch(2)
    assert [index for index, _ in again] == orders[2][0]  # the order is a function of (seed, epoch)


def test_resumed_sampler_skips_the_samples_already_done():
    sampler = SeededSampler(Sized(9), 2, 1, seed=0)
    sampler.set_epoch(4)
    full = [index for index, _ in sampler]
    for skip in range(len(full) + 3):  # a stop on the very last step saves skip >= the shard length
        sampler.set_epoch(4, skip=skip)
        assert [index for index, _ in sampler] == full[skip:]
        assert len(sampler) == len(full[skip:])


def test_sync_batch_norm_only_when_asked_and_then_ddp_leaves_the_buffers_to_it(data: Path, tmp_path: Path):
    """--sync-bn (off by default): SyncBatchNorm layers under torchrun, DDP's buffer broadcast off; refused in one
    line on a CPU, where DDP rejects SyncBatchNorm."""
    ranks = devices.DistInfo(rank=0, world_size=2)
    for argv, expected in (([], 0), (["--sync-bn"], 13)):  # VGG16-BN has 13 BatchNorm layers
        model = place_model(FCN(FCNConfig("fcn32s", "vgg16_bn", 11, fc_width=8)), settings_of(*argv).model,
                            torch.device("cpu"), ranks)
        assert sum(isinstance(layer, torch.nn.SyncBatchNorm) for layer in model.modules()) == expected
    assert buffer_sync(False) == {}
    assert buffer_sync(True) in ({"forward_sync_buffers": False}, {"broadcast_buffers": False})
    with pytest.raises(UserError, match="^--sync-bn: SyncBatchNorm runs on CUDA GPUs only"):
        train.setup(train.parse_args(fx.train_args(data, tmp_path / "run", "--sync-bn")[1:]))


# train.py's entry point with rank 1's loss made NaN in epoch 2 (its weights stay finite): one rank diverges
DIVERGING = """
import math, sys
sys.path.insert(0, {repo!r})
import cfg, train
import engine.loop
from engine.control import TrainingDiverged
real = engine.loop.accumulation_step

def step(model, batches, optimizer, scaler, loss_fn, runtime, epoch, index):
    loss = real(model, batches, optimizer, scaler, loss_fn, runtime, epoch, index)
    return loss * math.nan if (runtime.dist.rank, epoch) == (1, 2) else loss

engine.loop.accumulation_step = step
try:
    train.main(train.parse_args())
except TrainingDiverged as error:
    cfg.fail(str(error), code=1)
"""


def test_a_rank_that_diverges_stops_every_rank_with_the_folder_complete(data: Path, tmp_path: Path):
    """Rank 1 alone sees a NaN loss in epoch 2: the ranks agree on it at once, every one exits (a rank left
    waiting for another would hang until the hard timeout fails the test) and rank 0 leaves a complete folder."""
    script = tmp_path / "diverging_train.py"
    script.write_text(DIVERGING.format(repo=str(fx.REPO)))
    out = tmp_path / "run"
    started = time.monotonic()
    result = fx.run([*TORCHRUN, str(script), *fx.train_args(data, out, "--epochs", "3")[1:]], check=False, timeout=240)
    assert result.returncode != 0 and time.monotonic() - started < 240
    assert result.stderr.count("error: loss became NaN/inf in epoch 2") == 2, result.stderr  # both ranks, one line
    for name in ("last.pth", "best.pth", "history.csv", "curves.png", "val_samples.png", "results.json"):
        assert (out / name).is_file(), name
    assert fx.load(out / "last.pth")["epoch"] == 1
    results = json.loads((out / "results.json").read_text())
    assert not results["completed"] and results["stopped_epoch"] == 2 and results["stop_reason"].startswith("diverged")


# train.py's entry point with slow checkpoint writes (rank 0 writes): 1.5 s more per file
SLOW_WRITES = """
import sys, time
sys.path.insert(0, {repo!r})
import cfg, train
import engine.checkpoints as checkpoints
real = checkpoints.save_checkpoint
checkpoints.save_checkpoint = lambda state, path: (time.sleep(1.5), real(state, path))
cfg.run_script(lambda: train.main(train.parse_args()))
"""


def test_a_budget_under_torchrun_ends_completed_on_every_rank_without_a_hang(data: Path, tmp_path: Path):
    """2 gloo ranks, a checkpoint write (rank 0's, every epoch) longer than an epoch, a 30 s budget: rank 0's plan
    and deadline are every rank's, so all of them end, completed, within the budget; a rank left waiting for
    another would run into the hard timeout."""
    script, out = tmp_path / "slow_writes_train.py", tmp_path / "run"
    script.write_text(SLOW_WRITES.format(repo=str(fx.REPO)))
    started = time.monotonic()
    fx.run([*TORCHRUN, str(script), *fx.train_args(data, out, "--epochs", "1000", "--schedule", "poly",
                                                   "--save-every", "0", "--log-every", "2", "--time-budget", "30s")[1:]],
           timeout=180)
    assert time.monotonic() - started < 30 + 15  # torchrun's own start and exit on top of the budget
    results = json.loads((out / "results.json").read_text())
    assert results["completed"] and results["time_budget"]["spent"] <= 30
    assert fx.load(out / "last.pth")["scheduler"]["last_epoch"] == results["time_budget"]["total"]
