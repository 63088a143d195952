"""No host sync inside the training and evaluation loops: on CUDA under torch.cuda.set_sync_debug_mode
(skipped without a GPU), and on the CPU the piece that used to sync, the normalisation constants."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import settings_of  # noqa: E402

import dataset  # noqa: E402
import devices  # noqa: E402
import train  # noqa: E402
from engine.build import build_optimizer
from engine.control import decide_after_step
from engine.loop import epoch_loss_on_host, evaluate, train_one_epoch  # noqa: E402
from engine.loss import SegmentationLoss
from engine.run import EpochProgress, Runtime  # noqa: E402
from engine.schedule import Schedule, build_scheduler  # noqa: E402
from evalution_segmentaion import ConfusionMatrix  # noqa: E402
from fcn import FCN, FCNConfig  # noqa: E402

NUM_CLASSES = 11
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_normalization_constants_are_made_once_per_device(monkeypatch):
    """Building mean/std from Python lists is a pageable host-to-device copy (a sync on CUDA): only once."""
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = dataset.normalize_batch(images)  # fills the cache for the CPU
    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    for channels_last in (False, True, False):
        assert torch.equal(dataset.normalize_batch(images, channels_last), expected)
    assert made == []
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    assert torch.allclose(expected[:, :, :1, :1], (images[:, :, :1, :1].float() - mean) /
                          (torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255))


def cuda_run(batches: int) -> tuple[FCN, DataLoader, tuple, Runtime]:
    """A narrow FCN-8s on the GPU with the default fast path (AMP, channels_last, fused SGD) and a pinned
    loader of `batches` batches, the last one smaller (as CamVid's 367 = 45×8 + 7)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = FCN(FCNConfig("fcn8s", "vgg16_bn", NUM_CLASSES, fc_width=16)).to(device, memory_format=torch.channels_last)
    optim = settings_of("--optimizer", "sgd", "--lr", "0.01", "--weight-decay", "5e-4", "--epochs", "2",
                        "--warmup-epochs", "1", "--schedule", "poly").optim
    optimizer = build_optimizer(model, optim, device)
    scheduler = build_scheduler(optimizer, optim, batches, budgeted=False)
    runtime = Runtime(device, devices.amp_dtype(device, True), True, log_every=1000, clip_grad=10.0)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp == torch.float16)
    count = 2 * batches - 1
    images = torch.randint(0, 256, (count, 3, 64, 96), dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (count, 64, 96), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, labels), batch_size=2, pin_memory=True)
    return model, loader, (optimizer, scheduler, scaler), runtime


def syncs_allowed_from_here(function):
    """`function` with CUDA syncs allowed from its call on: the end-of-loop summaries (on_host,
    ConfusionMatrix.compute) are the loops' sanctioned syncs."""
    def wrapper(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        return function(*args, **kwargs)
    return wrapper


@needs_cuda
def test_train_and_eval_loops_never_sync_the_host_before_their_end(monkeypatch):
    model, loader, (optimizer, scheduler, scaler), runtime = cuda_run(3)
    loss_fn = SegmentationLoss().cuda()
    train_one_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, runtime, 1, EpochProgress())
    evaluate(model, loader, NUM_CLASSES, runtime)  # warm-up: caches, cuDNN autotuning, lazy CUDA state
    torch.cuda.synchronize()
    # log_every=1000: the loops' only syncs are the final loss check and metrics
    monkeypatch.setattr(train, "on_host", syncs_allowed_from_here(epoch_loss_on_host))
    monkeypatch.setattr(ConfusionMatrix, "compute", syncs_allowed_from_here(ConfusionMatrix.compute))
    try:
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises a RuntimeError
        assert train_one_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, runtime, 2,
                                     EpochProgress())
        torch.cuda.set_sync_debug_mode("error")
        metrics = evaluate(model, loader, NUM_CLASSES, runtime)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert 0 <= metrics["pixel_accuracy"] <= 1


def test_ranks_agree_only_every_log_every_steps(tmp_path: Path, monkeypatch):
    """Under torchrun the ranks' agreement is an all-reduce plus a host sync: only on multiples of --log-every,
    the same steps on every rank (the end of an epoch has its own)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        reduced = []
        real_all_reduce = torch.distributed.all_reduce
        monkeypatch.setattr(torch.distributed, "all_reduce",
                            lambda *a, **k: (reduced.append(1), real_all_reduce(*a, **k)))
        ranks = devices.DistInfo(rank=0, world_size=2)  # the multi-process code path
        runtime = Runtime(torch.device("cpu"), None, False, ranks, log_every=4)
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule("poly", 100, 1, 0))
        progress, left = EpochProgress(), []
        runtime.stop_flag.requested = True
        for _ in range(8):
            optimizer.step()  # a step before the scheduler's, as in training (and no warning from torch)
            scheduler.step()
            progress.steps += 1
            progress.count += 1
            left.append(decide_after_step(runtime, scheduler, torch.zeros((), dtype=torch.float64), progress, 1,
                                          tqdm(disable=True)))
        assert left == [False, False, False, True] + [False, False, False, True]
        assert len(reduced) == 2  # steps 4 and 8
    finally:
        torch.distributed.destroy_process_group()


def test_fp16_with_a_scaler_where_bf16_is_only_emulated(monkeypatch):
    """Pre-Ampere GPUs emulate bf16 (torch.cuda.is_bf16_supported() says True): fp16 is faster there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert devices.amp_dtype(torch.device("cuda"), True) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # a torch without the argument
    assert devices.amp_dtype(torch.device("cuda"), True) == torch.bfloat16
    assert devices.amp_dtype(torch.device("cuda"), False) is None and devices.amp_dtype(torch.device("cpu"), False) is None
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: False)  # a CPU without bf16 instructions runs fp32
    assert devices.amp_dtype(torch.device("cpu"), True) is None
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: True)
    assert devices.amp_dtype(torch.device("cpu"), True) == torch.bfloat16
