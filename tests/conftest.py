"""Shared fixtures: a tiny CamVid-layout folder written per test session, and a narrow-model train run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cfg  # noqa: E402
from dataset import ClassTable  # noqa: E402

# Label maps encoded by the tests go to a throw-away folder, never to the user's ~/.cache.
os.environ[cfg.LABEL_CACHE_ENV] = tempfile.mkdtemp(prefix="fcn-label-cache-")
# One compute thread in this process, as in the subprocesses below: `-n auto` starts a worker per core, and
# OpenMP threads of two processes sharing the cores wait on each other and make every step far slower; and a run
# in this process must give a subprocess's numbers bit for bit, which another thread count does not.
import torch  # noqa: E402

torch.set_num_threads(1)

SIZE = (64, 96)  # H, W: tiny, not a multiple of 32, so padding and cropping paths run
# A narrow FCN-8s on the CPU. The 32x32 train crop (the smallest FCN input) keeps a step well under a
# second on 2 cores; validation still runs on the full 64x96 images. In fp32 (--no-amp): the tests compare
# runs bit for bit, and bf16 kernels are not bit-reproducible on every CPU (test_interrupt.py checks that).
SMALL_TRAIN = ["--fc-width", "16", "--backbone", "vgg16", "--batch-size", "2", "--eval-batch-size", "2",
               "--workers", "0", "--device", "cpu", "--crop-size", "32", "32", "--log-every", "1", "--no-amp"]


def make_sample(rng: np.random.Generator, table: ClassTable,
                size: tuple[int, int] = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A blocky label map (with a void stripe) of size (H, W), divisible by (4, 6), and a photo whose colour
    follows the labels, plus noise."""
    blocks = rng.integers(0, table.num_classes, size=(4, 6))
    labels = np.kron(blocks, np.ones((size[0] // 4, size[1] // 6), dtype=np.int64))
    labels[:, :3] = cfg.IGNORE_INDEX
    palette = table.palette()
    photo = palette[labels].astype(np.int64) + rng.integers(-20, 20, size=(*size, 3))
    return np.clip(photo, 0, 255).astype(np.uint8), labels


def write_camvid(root: Path, counts: dict[str, int], seed: int = 0, size: tuple[int, int] = SIZE) -> Path:
    """A CamVid-layout folder of (H, W) images: split/<stem>.png|jpg and split_labels/<stem>_L.png with
    class_dict colours."""
    table = ClassTable.from_csv(cfg.DEFAULT_CLASS_DICT)
    rng = np.random.default_rng(seed)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "class_dict.csv").write_text(cfg.DEFAULT_CLASS_DICT.read_text())
    for split, count in counts.items():
        (root / split).mkdir(exist_ok=True)
        (root / f"{split}_labels").mkdir(exist_ok=True)
        for index in range(count):
            photo, labels = make_sample(rng, table, size)
            stem = f"{split}_{index:03d}"
            extension = ".png" if index % 2 == 0 else ".jpg"  # both kinds CamVid copies use
            Image.fromarray(photo).save(root / split / f"{stem}{extension}")
            Image.fromarray(table.palette()[labels]).save(root / f"{split}_labels" / f"{stem}_L.png")
    return root


@pytest.fixture(scope="session")
def camvid(tmp_path_factory) -> Path:
    """4 train, 3 val, 3 test images of 64×96."""
    return write_camvid(tmp_path_factory.mktemp("camvid") / "CamVid", {"train": 4, "val": 3, "test": 3})


def real_camvid() -> str | None:
    """The real CamVid the real-data tests run on: $CAMVID_ROOT when set, else the repo's data/CamVid when it
    holds a complete CamVid (a full download or one with a test sample), else None."""
    from dataset import camvid_contents
    if os.environ.get("CAMVID_ROOT"):
        return os.environ["CAMVID_ROOT"]
    local = REPO / "data" / "CamVid"
    return str(local) if local.is_dir() and not camvid_contents(local)[1] else None


def subprocess_env() -> dict[str, str]:
    """Unbuffered output, no $CAMVID_ROOT leaking in, and one compute thread per process: on a busy
    2-core machine two OpenMP threads that wait on each other make a step up to 10x slower, and one
    thread count everywhere keeps CPU runs bit-comparable. Python's fault handler is on, so a command that
    runs past its timeout prints where each of its threads stands before it is killed."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CAMVID_ROOT": "", "OMP_NUM_THREADS": "1",
            "PYTHONFAULTHANDLER": "1"}


def end_with_stacks(process: subprocess.Popen) -> tuple[str | None, str | None]:
    """End a stuck command started with subprocess_env(): SIGABRT makes the fault handler write every thread's
    stack to its stderr before it dies (killed if it lingers); its remaining piped output. Bounded waits: children
    of its own (torchrun's ranks) may outlive it and hold the pipes open."""
    process.send_signal(signal.SIGABRT)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    try:
        return process.communicate(timeout=10)
    except subprocess.TimeoutExpired as lingering:
        process.wait()
        return tuple(text.decode(errors="replace") if isinstance(text, bytes) else text
                     for text in (lingering.stdout, lingering.stderr))


def run(command: list[str], check: bool = True, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command in the repo root (`env`: variables set for it alone); a non-zero exit fails with both output
    streams (unless check=False), and so does a timeout, with the Python stack of every thread of the command."""
    with subprocess.Popen(command, cwd=REPO, env={**subprocess_env(), **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stdout, stderr = end_with_stacks(process)
            raise AssertionError(f"{' '.join(command)} ran past {timeout} s:\n{stdout}\n{stderr}") from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def settings_of(*argv: str):
    """The typed settings train.py hands to engine/ for these flags."""
    import train
    return train.settings_from_args(train.parse_args(list(argv)))


def train_in_process(*argv: str) -> None:
    """train.py's main in this process (no interpreter start-up): pytest keeps its signal handlers, and a time
    budget's clock starts at set-up rather than with pytest's process."""
    import devices
    import train
    from engine import budget
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(devices.StopFlag, "install", lambda self: None)
        patch.setattr(budget, "process_age", lambda: 0.0)
        train.main(train.parse_args(list(argv)))


def fit_in_process(args: list[str], monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> None:
    """engine.loop.fit in this process (pytest keeps its signal handlers, and a budget's clock starts at set-up, not
    with pytest's process); optionally a stop request after N optimizer steps. Undoes `monkeypatch` after."""
    import devices
    import train
    from engine import budget, loop, step
    monkeypatch.setattr(devices.StopFlag, "install", lambda self: None)
    monkeypatch.setattr(budget, "process_age", lambda: 0.0)
    run = train.setup(train.parse_args(args))
    if stop_after is not None:
        optimizer_step, steps = step.optimizer_step, []

        def counting_step(*a, **k):
            optimizer_step(*a, **k)
            steps.append(1)
            run.runtime.stop_flag.requested = len(steps) >= stop_after
        monkeypatch.setattr(step, "optimizer_step", counting_step)
    try:
        loop.fit(run)
    finally:
        monkeypatch.undo()


def run_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a repo script (train.py, test.py, ...) with this Python."""
    return run([sys.executable, *args], check=check, timeout=timeout)


@pytest.fixture(scope="session")
def trained_run(camvid: Path, tmp_path_factory) -> Path:
    """A run folder after 1 epoch then --resume to 2 epochs (shared by the CLI tests)."""
    out = tmp_path_factory.mktemp("run")
    common = ["--data-root", str(camvid), "--out", str(out), *SMALL_TRAIN]
    train_in_process(*common, "--epochs", "1")
    train_in_process(*common, "--epochs", "2", "--resume")
    return out


def reactive_checkpoint(path: Path, backbone: str, fc_width: int):
    """Save a narrow FCN-8s whose scoring layers are random (not the paper's zeros), so its predictions and loss
    react to everything before them; returns the model in eval mode."""
    import torch

    from engine.checkpoints import save_checkpoint
    from fcn import FCN, FCNConfig
    torch.manual_seed(0)
    model = FCN(FCNConfig("fcn8s", backbone, 11, fc_width=fc_width))
    with torch.no_grad():
        for layer in (model.score_fr, model.score_pool4, model.score_pool3):
            layer.weight.normal_(std=0.5)
    save_checkpoint({"model": model.state_dict(), "config": {"model": model.config.to_dict()}}, path)
    return model.eval()
