"""ONNX Runtime backend: a graph written by export.py, called like the PyTorch FCN on normalised batches."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import cfg
from cfg import UserError
from dataset import ClassTable

INPUT, OUTPUT = "images", "logits"  # graph input/output names (export.py writes them)
METADATA_TAG = "fcn_camvid"  # metadata key export.py sets: marks a graph of this project
INSTALL_HINT = "install it: pip install -r requirements-export.txt"


def import_onnxruntime():
    """The onnxruntime module with its usage events off, or a one-line UserError telling how to install it."""
    # onnxruntime (1.32, Linux) sends usage events to Microsoft from a thread of its own unless this is set when it
    # loads (disable_telemetry_events() does not stop them); a value the user set wins
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"onnxruntime is not installed; {INSTALL_HINT}") from exc
    return onnxruntime


class OnnxModel:
    """An ONNX Runtime session with the calling convention of fcn.FCN (torch tensors in, logits out)."""

    is_onnx = True  # inference code skips torch-only steps (autocast, channels_last, compile) on it

    def __init__(self, session, num_classes: int, metadata: dict[str, str]):
        self.session = session
        self.num_classes = num_classes
        self.metadata = metadata

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on, in priority order."""
        return self.session.get_providers()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×H×W ImageNet-normalised float32 (any device) -> N×C×H×W float32 logits on images.device."""
        height, width = images.shape[-2:]
        if min(height, width) < cfg.MIN_INPUT_SIDE:  # the same guard as fcn.FCN.forward
            raise ValueError(f"input {height}x{width} is smaller than {cfg.MIN_INPUT_SIDE}x{cfg.MIN_INPUT_SIDE}")
        array = images.detach().to("cpu", torch.float32).numpy()  # ORT copies a channels-last view itself
        logits = self.session.run([OUTPUT], {INPUT: array})[0]
        return torch.from_numpy(logits).to(images.device)

    def eval(self) -> "OnnxModel":
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":
        return self


def session_errors(ort) -> tuple[type[BaseException], ...]:
    """The exceptions onnxruntime raises for a file it cannot load (its own classes derive from Exception)."""
    state = ort.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidProtobuf", "NoSuchFile", "InvalidGraph", "InvalidArgument", "NotImplemented")
    return (OSError, RuntimeError, *(getattr(state, name) for name in names if hasattr(state, name)))


def providers_for(ort, device: torch.device) -> list[str]:
    """CUDA first when the device is CUDA and this onnxruntime build has it, then the CPU."""
    cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def graph_classes(session, metadata: dict[str, str], path: Path) -> int:
    """The class count of an export.py graph (from its metadata); a foreign graph is a UserError."""
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if METADATA_TAG not in metadata or inputs != [INPUT] or outputs != [OUTPUT]:
        raise UserError(f"{path}: not an ONNX model written by export.py (inputs {inputs}, outputs {outputs}, "
                        f"no '{METADATA_TAG}' metadata)")
    try:
        return len(json.loads(metadata["class_names"]))
    except (KeyError, ValueError, TypeError):
        channels = session.get_outputs()[0].shape[1]
        if not isinstance(channels, int):
            raise UserError(f"{path}: neither class_names metadata nor a fixed class count in '{OUTPUT}'") from None
        return channels


def metadata_table(metadata: dict[str, str]) -> dict | None:
    """The class table export.py stored in the metadata (None for a graph without class names)."""
    try:
        table = {"names": json.loads(metadata["class_names"])}
    except (KeyError, ValueError):
        return None
    for key, entry in (("colors", "class_colors"), ("void_colors", "void_colors")):
        if entry in metadata:
            table[key] = json.loads(metadata[entry])
    return table


def check_classes(model: "OnnxModel", table: ClassTable, path: str | Path) -> None:
    """The graph must predict as many classes as the table has."""
    if model.num_classes != table.num_classes:
        raise UserError(f"{path}: ONNX model predicts {model.num_classes} classes but the class table has "
                        f"{table.num_classes}")


def load_onnx(path: str | Path, table: ClassTable | None, device: torch.device) -> OnnxModel:
    """Open an export.py graph in ONNX Runtime and check it predicts the table's classes (if one is given)."""
    ort = import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found")
    options = ort.SessionOptions()
    # The same thread budget as torch (which follows OMP_NUM_THREADS); ORT's default is every core
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=providers_for(ort, device))
    except session_errors(ort) as exc:
        raise UserError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0]})") from exc
    metadata = session.get_modelmeta().custom_metadata_map
    model = OnnxModel(session, graph_classes(session, metadata, path), metadata)
    if table is not None:
        check_classes(model, table, path)
    return model
