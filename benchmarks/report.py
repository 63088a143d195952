"""bench.py's human-readable tables, from its JSON object."""
from __future__ import annotations

import cfg
from benchmarks.plan import DATA_HEADROOM, RECIPE


def number(value: float | None, unit: str = "", digits: int = 1) -> str:
    """A table cell: thousands separators, or n/a for what was not measured."""
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def size(hw: list[int]) -> str:
    """[H, W] -> 'HxW'."""
    return f"{hw[0]}x{hw[1]}"


def ratio(slower: float | None, faster: float | None) -> str:
    """'1.23x' for faster/slower, blank when either is missing."""
    return "" if slower is None or faster is None else f"{faster / slower:.2f}x"


def data_rows(r: dict) -> list[tuple[str, ...]]:
    """(what, wall clock, per worker CPU-second) rows of the data pipeline table."""
    common = f"1 worker, batch {r['data_batch']}, uint8"
    cache = "label cache warm after pass 0" if r["label_cache"] else "no label cache"
    return [(f"data pipeline ({cache})", "img/s (wall)", "img/s per CPU-s", ""),
            (f"train transform, centre crop {size(cfg.CROP_SIZE)} ({common})", number(r["data_train_img_s"]),
             number(r["data_train_cpu_img_s"]), ""),
            (f"train transform, --recipe {RECIPE} augmentation ({common})",
             number(r["data_recipe_img_s"]), number(r["data_recipe_cpu_img_s"]), ""),
            (f"eval transform, full image ({common})", number(r["data_eval_img_s"]),
             number(r["data_eval_cpu_img_s"]), ""),
            (f"train transform without the label cache ({common})", number(r["data_train_nocache_img_s"]),
             number(r["data_train_nocache_cpu_img_s"]), "")]


def model_rows(r: dict) -> list[tuple[str, ...]]:
    """(what, eager fp32, fast path, speedup) rows of the model table; speedup > 1 means the fast path wins."""
    rows = [("model", "eager fp32", "fast path", "speedup")]
    for key, what, unit, digits in (
            ("train_{}_img_s", f"train step {size(r['train_size'])} batch {r['train_batch']}", " img/s", 2),
            ("infer_{}_img_s", f"inference {size(r['infer_size'])} batch {r['infer_batch']}", " img/s", 2),
            ("infer_{}_latency_ms", f"inference {size(r['infer_size'])} batch 1 latency", " ms", 1),
            ("train_{}_tflops", "train step achieved", " TFLOP/s", 3),
            ("train_{}_peak_mem_mb", "train step peak GPU memory above its start", " MiB", 0)):
        eager, fast = r[key.format("eager")], r[key.format("fast")]
        speedup = "" if "mem" in key else ratio(fast, eager) if "latency" in key else ratio(eager, fast)
        rows.append((what, number(eager, unit, digits), number(fast, unit, digits), speedup))
    mfu, mfu_spec = (None if r[key] is None else 100 * r[key] for key in ("mfu", "mfu_spec"))
    memory = "GPU, torch allocated" if r["device"] == "cuda" else "CPU, peak RSS of the main process"
    return rows + [
        (f"FLOPs/img, train step fwd+bwd {size(r['train_size'])}", number(r["flops_per_img"] / 1e9, " GFLOP"), "", ""),
        (f"FLOPs/img, inference fwd {size(r['infer_size'])}", number(r["infer_flops_per_img"] / 1e9, " GFLOP"), "", ""),
        (f"bf16 {r['matmul_side']}x{r['matmul_side']} matmul peak", number(r["matmul_peak_tflops"], " TFLOP/s"), "", ""),
        ("bf16 dense peak, vendor spec", number(r["spec_peak_tflops"], " TFLOP/s"), "", ""),
        ("MFU of the fast train step vs the measured matmul", "", number(mfu, " %"), ""),
        ("MFU of the fast train step vs the spec peak", "", number(mfu_spec, " %"), ""),
        (f"workers for {DATA_HEADROOM}x the fast train step (recipe augmentation)",
         "", "n/a" if r["workers_needed"] is None else str(r["workers_needed"]), ""),
        (f"peak memory ({memory})", number(r["peak_mem_mb"], " MiB", 0), "", "")]


def backbone_rows(r: dict) -> list[tuple[str, ...]]:
    """(backbone, train img/s, inference img/s, parameters) rows of the fast path on every backbone."""
    rows = [(f"FCN-8s per backbone, fast path: train {size(r['train_size'])} batch {r['train_batch']}, inference "
             f"{size(r['infer_size'])} batch {r['infer_batch']}", "train img/s", "infer img/s", "params")]
    for name, row in r["backbones"].items():
        width = f", fc {row['fc_width']}" if row["fc_width"] else ""
        rows.append((f"{name}{width} ({row['train_gflops_per_img']:.1f} GFLOP/img train)",
                     number(row["train_img_s"], "", 2), number(row["infer_img_s"], "", 2),
                     f"{row['params_m']:.1f}M"))
    return rows


def print_report(r: dict) -> None:
    """The human-readable tables."""
    print(f"bench.py on {r['device']} ({r['device_name']}), torch {r['torch']}, {r['date']}")
    print(f"model: FCN-8s {r['backbone']} fc_width {r['fc_width']}" +
          (" (narrowed from the paper's 4096 to keep the run short)" if r["fc_width"] != 4096 else ""))
    same = r["fast_path"] == r["eager_path"]
    print(f"eager: {r['eager_path']}, non-fused Adam | fast path: {r['fast_path']}" +
          (" (= eager: --no-channels-last, and no AMP on this device)" if same else ""))
    if r["device"] == "cuda":
        print(f"eager fp32 keeps PyTorch's TF32 defaults (its convolutions run in TF32 on Ampere and later): "
              f"cuDNN conv {r['tf32_conv']}, matmul {r['tf32_matmul']}")
    print(f"timing: medians of {r['repeats']} alternating eager/fast blocks of {r['steps']} call(s) after warm-up")
    rows = [*data_rows(r), ("", "", "", ""), *model_rows(r)]
    if r["backbones"]:
        rows += [("", "", "", ""), *backbone_rows(r)]
    width = max(len(row[0]) for row in rows)
    for what, first, second, third in rows:
        print(f"{what:<{width}}  {first:>16}  {second:>16}  {third:>8}".rstrip())
