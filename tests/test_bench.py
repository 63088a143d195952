"""bench.py's figures that need no GPU to check: spec-peak lookup, MFU, workers needed, recipe augmentation."""
from __future__ import annotations

import json
import time

import pytest
import torch

import bench
from benchmarks import data, models, plan, timing
import train
from dataset import ClassTable
from devices import DistInfo
from engine.build import build_loaders

NEW_KEYS = {"data_recipe_img_s", "data_recipe_cpu_img_s", "spec_peak_tflops", "mfu_spec", "workers_needed"}


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4),  # what the SXM5 board reports
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100", None),  # form factor unknown: no guess
    ("NVIDIA A10", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("Tesla V100-SXM2-16GB", None),
    ("", None),
])
def test_spec_peak_is_the_vendor_dense_bf16_figure(name, tflops):
    assert models.spec_peak_tflops(name) == tflops


def test_efficiency_divides_by_measured_and_spec_peaks():
    h100 = models.efficiency(494.7, 700.0, "NVIDIA H100 80GB HBM3")
    assert h100 == {"matmul_peak_tflops": 700.0, "mfu": pytest.approx(494.7 / 700.0),
                    "spec_peak_tflops": 989.4, "mfu_spec": pytest.approx(0.5)}
    assert models.efficiency(1.0, 700.0, "Some Future GPU")["mfu_spec"] is None
    assert models.efficiency(0.05, None, None) == {"matmul_peak_tflops": None, "mfu": None,
                                                  "spec_peak_tflops": None, "mfu_spec": None}


@pytest.mark.parametrize("train_img_s, data_img_s, workers", [
    (1000.0, 220.0, 10), (110.0, 220.0, 1), (111.0, 220.0, 2), (None, 220.0, None), (1000.0, None, None)])
def test_workers_needed_keeps_data_twice_ahead(train_img_s, data_img_s, workers):
    assert models.workers_needed(train_img_s, data_img_s) == workers


def test_matmul_warm_up_lasts_at_least_200_ms(monkeypatch):
    start = time.perf_counter()
    calls = timing.warm_up(lambda: time.sleep(0.01), plan.MATMUL_WARMUP_S, torch.device("cpu"))
    assert plan.MATMUL_WARMUP_S >= 0.2 and time.perf_counter() - start >= 0.2 and calls > 3
    warm_ups = []
    monkeypatch.setattr(models, "warm_up", lambda fn, seconds, device: warm_ups.append(seconds))
    assert models.matmul_peak_tflops(torch.device("cpu"), 32) > 0  # the GPU code, run small on the CPU
    assert warm_ups == [plan.MATMUL_WARMUP_S]


def steps(transform) -> list[tuple[str, dict]]:
    """A Compose as comparable (class name, attributes) pairs."""
    return [(type(step).__name__, vars(step)) for step in transform.steps]


def test_recipe_augmentation_is_the_one_train_py_builds(camvid):
    args = train.parse_args(["--recipe", "camvid", "--data-root", str(camvid), "--workers", "0",
                             "--no-label-cache"])
    table = ClassTable.from_csv(camvid / "class_dict.csv")
    train_loader, _ = build_loaders(train.settings_from_args(args).data, table, torch.device("cpu"), DistInfo(), 0)
    built = steps(data.recipe_transform())
    assert built == steps(train_loader.dataset.transform)
    assert built == [("RandomScale", {"low": 0.5, "high": 2.0}), ("RandomCrop", {"size": (352, 480)}),
                     ("RandomHorizontalFlip", {"p": 0.5}), ("ColorJitter", {"strength": 0.2})]


def test_recipe_rate_is_measured_through_the_recipe_augmentation(camvid, monkeypatch):
    seen = []

    def fake_rate(dataset, sampler, epochs, pin):
        seen.append(steps(dataset.transform))
        return float(len(seen)), None  # the call number, to find which dataset each key timed
    monkeypatch.setattr(data, "loader_rate", fake_rate)
    table = ClassTable.from_csv(camvid / "class_dict.csv")
    result = data.measure_data(str(camvid), table, plan.PLANS["quick"], torch.device("cpu"), None)
    assert seen[int(result["data_recipe_img_s"]) - 1] == steps(data.recipe_transform())
    assert seen[int(result["data_train_img_s"]) - 1] == [("CenterCrop", {"size": (352, 480)})]


def test_quick_bench_reports_recipe_rate_and_spec_mfu(camvid, tmp_path, capsys):
    report = tmp_path / "bench.json"
    args = bench.get_args_parser().parse_args(["--quick", "--device", "cpu", "--data-root", str(camvid),
                                               "--json", str(report), "--backbones", "none"])
    with torch.random.fork_rng():
        result = bench.main(args)
    printed = capsys.readouterr().out
    assert NEW_KEYS <= set(json.loads(report.read_text()))
    assert result["data_recipe_img_s"] > 0
    assert result["data_recipe_cpu_img_s"] is None or result["data_recipe_cpu_img_s"] > 0  # None without /proc
    # MFU is a GPU figure, and a CPU train rate says nothing of a GPU run's workers.
    for key in ("matmul_peak_tflops", "mfu", "spec_peak_tflops", "mfu_spec", "workers_needed"):
        assert result[key] is None, key
    assert "--recipe camvid augmentation" in printed and "MFU of the fast train step vs the spec peak" in printed


def test_profile_lists_the_costliest_operators_first():
    from benchmarks.profile import profile_rows, top_operators
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    rows = top_operators(lambda: (a @ b, a[0].sum()), torch.device("cpu"), steps=3, rows=5)
    assert rows and rows[0]["name"] == "aten::mm" and rows[0]["calls_per_step"] == 1.0
    assert [row["ms_per_step"] for row in rows] == sorted((row["ms_per_step"] for row in rows), reverse=True)
    assert 0 < sum(row["share"] for row in rows) <= 1.0 + 1e-9
    assert profile_rows(rows)[1].startswith("aten::mm")
