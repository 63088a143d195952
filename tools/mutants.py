"""Hand-written mutants of the core modules, each run against the tests that must catch it.

    python tools/mutants.py --list            # what would run
    python tools/mutants.py [NAME ...]        # all mutants, or the named ones

Each mutant replaces one exact snippet of one file in a temporary copy of the repository (the tracked and
untracked-but-not-ignored files; the working tree is never touched) and runs its test files there with
`pytest -x -q`. A failing test kills the mutant; a survivor is a promise no test checks. First each test
selection runs once on the unmutated copy (`--no-baseline` skips that): a kill only counts if it passes.
CPU-heavy (one pytest process per mutant, one thread each): run on demand, not in CI; pytest does not
collect this file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """One deliberate bug: `original` (found exactly once in `file`) becomes `replacement`."""

    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments: test files, node ids or -k expressions


DATA, METRICS, RECIPE = ("tests/test_data.py",), ("tests/test_metrics.py",), ("tests/test_recipe.py",)
RESUME = ("tests/test_resume_equality.py",)
DOWNLOAD = ("tests/test_download.py",)
SCALE = ("tests/test_inference.py", "-k", "training_scale or dispatches or test_scale")
ACCUM = ("tests/test_accumulation.py",)
BUDGET = ("tests/test_budget.py",)
BACKBONES = ("tests/test_backbones.py", "-k", "not goes_through")
BUDGET_SIM = ("tests/test_budget.py", "-k", "simulated")
LEVERS = ("tests/test_levers.py",)
MUTANTS = [
    # metrics
    Mutant("evaluate-keeps-last-batch", "inference.py", "        confusion.update(predicted_classes(scores), labels)\n",
           "        confusion = ConfusionMatrix(num_classes, device)\n"
           "        confusion.update(predicted_classes(scores), labels)\n", METRICS),
    Mutant("confusion-transposed", "evalution_segmentaion.py", "target * n + prediction", "prediction * n + target",
           METRICS),
    Mutant("iou-union-double-counts", "evalution_segmentaion.py",
           "union = truth_total + predicted_total - true_positive", "union = truth_total + predicted_total", METRICS),
    Mutant("miou-absent-class-as-zero", "evalution_segmentaion.py", '"miou": float(iou.nanmean())',
           '"miou": float(iou.nan_to_num().mean())', METRICS),
    Mutant("fwiou-predicted-frequency", "evalution_segmentaion.py", "frequency = truth_total / total",
           "frequency = predicted_total / total", METRICS),
    Mutant("test-py-drops-last-batch", "test.py", "DataLoader(dataset, args.batch_size, num_workers",
           "DataLoader(dataset, args.batch_size, drop_last=True, num_workers", METRICS),
    Mutant("val-loader-drops-last-batch", "engine/build.py", "DataLoader(val_set, data.eval_batch_size, sampler",
           "DataLoader(val_set, data.eval_batch_size, drop_last=True, sampler",
           ("tests/test_distributed.py", "-k", "gloo")),
    Mutant("test-py-crop-ignored", "test.py", "eval_transform(cfg.CROP_SIZE if args.crop else None, args.downscale)",
           "eval_transform(None, args.downscale)", METRICS),
    # label encoding
    Mutant("hash-channels-swapped", "camvid/classes.py",
           "return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]",
           "return (rgb[..., 2] << 16) | (rgb[..., 1] << 8) | rgb[..., 0]", DATA),
    Mutant("unknown-colour-silent", "camvid/classes.py", "        if unknown.any():\n            raise UserError(",
           "        if False:\n            raise UserError(", DATA),
    Mutant("void-becomes-class-0", "camvid/classes.py", "np.full(len(self.void_colors), cfg.IGNORE_INDEX)",
           "np.zeros(len(self.void_colors))", DATA),
    Mutant("class-rows-off-by-one", "camvid/classes.py", "labels = np.concatenate([np.arange(self.num_classes),",
           "labels = np.concatenate([np.arange(1, self.num_classes + 1),", DATA),
    # pairing
    Mutant("pair-by-sorted-position", "camvid/layout.py",
           "return [(stem, images[stem], masks[stem]) for stem in sorted(images.keys() & masks.keys())], problems",
           "return [(stem, images[stem], mask) for stem, mask in zip(sorted(images.keys() & masks.keys()), "
           "sorted(masks[s] for s in images.keys() & masks.keys()))], problems", DATA),
    Mutant("duplicate-stem-silent", "camvid/layout.py", "        if path.stem in found:\n",
           "        if False:\n", DATA),
    Mutant("mask-suffix-unchecked", "camvid/layout.py", "        if stem.endswith(cfg.MASK_SUFFIX):\n",
           "        if True:\n", DATA),
    # transforms
    Mutant("mask-resized-bilinear", "transforms.py", "mask = TF.resize(mask[None], size, InterpolationMode.NEAREST)[0]",
           "mask = TF.resize(mask[None], size, InterpolationMode.BILINEAR)[0]", DATA),
    Mutant("random-crop-misses-mask", "transforms.py",
           "        left = int(uniform(rng) * (mask.shape[1] - self.size[1] + 1))\n"
           "        rows, cols = slice(top, top + self.size[0]), slice(left, left + self.size[1])\n"
           "        return image[:, rows, cols], mask[rows, cols]",
           "        left = int(uniform(rng) * (mask.shape[1] - self.size[1] + 1))\n"
           "        rows, cols = slice(top, top + self.size[0]), slice(left, left + self.size[1])\n"
           "        return image[:, rows, cols], mask[rows, :self.size[1]]", DATA),
    Mutant("flip-image-only", "transforms.py", "return image.flip(-1), mask.flip(-1)", "return image.flip(-1), mask",
           DATA),
    Mutant("mask-padded-with-0", "transforms.py", "F.pad(mask, (0, pad_w, 0, pad_h), value=cfg.IGNORE_INDEX)",
           "F.pad(mask, (0, pad_w, 0, pad_h), value=0)", DATA),
    Mutant("flip-always", "transforms.py", "        if uniform(rng) < self.p:\n", "        if True:\n", DATA),
    Mutant("jitter-brightness-only", "transforms.py",
           "        image = TF.adjust_contrast(image, uniform(rng, low, high))\n"
           "        image = TF.adjust_saturation(image, uniform(rng, low, high))\n", "", DATA),
    Mutant("augmentation-same-every-epoch", "dataset.py", "yield index, (self.seed, self.epoch)",
           "yield index, (self.seed, 0)", ("tests/test_distributed.py", "-k", "sampler")),
    Mutant("jitter-dropped", "transforms.py", "    if jitter > 0:\n", "    if jitter < 0:\n", DATA),
    Mutant("val-crop-ignored", "engine/build.py", "eval_transform(tuple(data.crop_size) if data.val_crop else None, data.downscale)",
           "eval_transform(None, data.downscale)", RECIPE),
    # schedule, optimiser, loss
    Mutant("poly-power-1", "engine/schedule.py", "(self.total - self.decay_start)) ** 0.9",
           "(self.total - self.decay_start)) ** 1.0", RECIPE),
    Mutant("warmup-starts-at-0", "engine/schedule.py", "* (step + 1 - self.ramp_start)", "* (step - self.ramp_start)", RECIPE),
    Mutant("weight-decay-ignored", "engine/build.py", '"weight_decay": weight_decay if decay else 0.0}',
           '"weight_decay": 0.0}', RECIPE),
    Mutant("clip-grad-ignored", "engine/step.py", "    if runtime.clip_grad > 0:\n", "    if runtime.clip_grad < 0:\n",
           RECIPE),
    Mutant("ohem-ignored", "engine/loss.py", "        if self.ohem_fraction <= 0:\n", "        if True:\n", RECIPE),
    Mutant("ohem-divides-by-k", "engine/loss.py", "return labelled.sum().clamp(max=self.kept(labels)).float()",
           "return torch.tensor(float(self.kept(labels)))", RECIPE),
    Mutant("median-freq-labelled-pixels-only", "engine/loss.py", "image_pixels += (counts > 0) * labels.numel()",
           "image_pixels += (counts > 0) * counts.sum()", RECIPE),
    Mutant("init-from-randomises-upsamplers", "engine/build.py", "                          strict=False)\n",
           "                          strict=False)\n"
           "    for layer in model.modules():\n"
           "        if isinstance(layer, nn.ConvTranspose2d):\n"
           "            nn.init.normal_(layer.weight, std=0.01)\n", RECIPE),
    # gradient accumulation
    Mutant("accum-per-batch-mean", "engine/step.py", "scaler.scale(total / denominator).backward()",
           "scaler.scale(total / safe_denominator(loss_fn.denominator(labels)) / runtime.accum_steps).backward()", ACCUM),
    Mutant("accum-resume-skips-batches-not-steps", "engine/loop.py",
           "images_per_step = settings.data.batch_size * settings.optim.accum_steps",
           "images_per_step = settings.data.batch_size", ACCUM),
    Mutant("accum-schedule-counts-batches", "engine/build.py", "math.ceil(len(train_loader) / settings.optim.accum_steps)",
           "len(train_loader)", ACCUM),
    Mutant("accum-all-reduce-every-batch", "engine/step.py", "sync=last)", "sync=True)", ACCUM),
    Mutant("accum-never-all-reduce", "engine/step.py", "sync=last)", "sync=False)", ACCUM),
    Mutant("resume-any-batch-product", "engine/checkpoints.py", "    if batch_size * optim.accum_steps != images:\n",
           "    if False:\n", ACCUM),
    Mutant("recipe-key-misspelt", "engine/recipes.py", "warmup_epochs=5,", "warmup_epoch=5,", RECIPE),
    Mutant("scale-flag-dropped", "transforms.py", "        steps.append(RandomScale(*scale))\n", "        pass\n",
           DATA + RECIPE),
    Mutant("cache-flag-ignored", "engine/build.py", "    if data.cache:\n", "    if False:\n", RECIPE),
    Mutant("class-weights-not-in-loss", "engine/build.py", 'return SegmentationLoss(weight, settings.ohem).to(device)',
           'return SegmentationLoss(None, settings.ohem).to(device)', RECIPE),
    # time budget and the run folder (issue 24: one mutant per finding, numbered as there)
    Mutant("tests-compare-bf16-bit-for-bit", "tests/conftest.py", '"--log-every", "1", "--no-amp"]',  # 0
           '"--log-every", "1"]', ("tests/test_interrupt.py", "-k", "fp32")),
    Mutant("budget-plan-fixed-after-the-first", "engine/budget.py", "        if total == self.total:\n",  # 1
           "        if total == self.total or self.total is not None:\n", BUDGET_SIM),
    Mutant("budget-plan-forgets-the-final-validation", "engine/budget.py",  # 2: the plan's reserve is not the deadline's
           "        available = self.left() - self.reserve(validate=True)\n",
           "        available = self.left() - self.reserve(validate=False)\n", BUDGET_SIM),
    Mutant("budget-each-rank-plans-alone", "devices.py", "*(main if info.is_main else [0.0] * len(main))",  # 3
           "*main", ("tests/test_distributed.py", "-k", "budget_under_torchrun")),
    Mutant("budget-added-on-resume-restarts-the-schedule", "engine/build.py",  # 4
           "    if run.runtime.budget is None and not planned:\n", "    if not planned:\n",
           ("tests/test_budget.py", "-k", "added")),
    Mutant("resume-ignores-the-process-count", "engine/checkpoints.py",  # 5
           '    saved_world = config.get("world_size", world_size)  # older checkpoints did not record it\n',
           "    saved_world = world_size\n", ("tests/test_run_folder.py", "-k", "process_count")),
    Mutant("budget-accepts-step-decay", "train.py", '        if args.schedule == "step":\n', "        if False:\n",  # 6
           ("tests/test_budget.py", "-k", "flags")),
    Mutant("resume-ignores-a-new-lr", "engine/checkpoints.py", '("optimizer", "lr", "weight_decay"',  # 7
           '("optimizer", "weight_decay"', ("tests/test_run_folder.py", "-k", "refuse")),
    Mutant("budget-measured-epoch-write-skipped", "engine/loop.py",  # 8
           "    if run.folder.due(metrics is not None, final or measuring):\n",
           "    if run.folder.due(metrics is not None, final):\n", ("tests/test_budget.py", "-k", "measured_epoch")),
    Mutant("last-pth-without-the-epochs-times", "engine/loop.py",  # 9
           "    set_times(row, train_seconds, val_seconds, time.perf_counter() - started)  # last.pth holds them too\n",
           "", ("tests/test_interrupt.py", "-k", "save_every")),
    Mutant("divergence-decided-per-rank", "engine/control.py", "    if nonfinite:\n", "    if not finite:\n",  # 10
           ("tests/test_distributed.py", "-k", "diverges")),
    Mutant("sync-bn-always-under-torchrun", "engine/build.py", "    if settings.sync_bn and dist.enabled:\n",  # 11
           "    if dist.enabled:\n", ("tests/test_distributed.py", "-k", "sync_batch")),
    Mutant("atomic-write-without-fsync", "engine/checkpoints.py", "        fsync(temporary)\n", "",  # 12
           ("tests/test_interrupt.py", "-k", "flushes")),
    Mutant("run-folder-imports-train", "engine/checkpoints.py", "from cfg import UserError\n",  # 13
           "from cfg import UserError\nif False:\n    import train  # noqa: F401\n",
           ("tests/test_architecture.py", "-k", "imports_train")),
    Mutant("engine-import-cycle", "engine/budget.py", "from cfg import UserError\n",
           "from cfg import UserError\nif False:\n    import engine.loop  # noqa: F401\n",
           ("tests/test_architecture.py", "-k", "cycle")),
    Mutant("budget-deadline-ignored", "engine/budget.py", "            total, self.cuts = step, self.cuts + 1\n",
           "            self.cuts += 1\n", BUDGET),
    Mutant("budget-keeps-the-provisional-schedule", "engine/schedule.py", "    schedule_of(scheduler).replan(total, step)\n",
           "", BUDGET),
    Mutant("budget-ignores-validation-cost", "engine/budget.py",
           "        work = more * self.costs.step + validations * self.costs.val\n",
           "        work = more * self.costs.step\n", BUDGET),
    Mutant("budget-warm-up-not-shrunk", "engine/schedule.py", "            if self.warmup_epochs >= 2:\n",
           "            if False:\n", BUDGET),
    Mutant("resume-forgets-the-budget-plan", "engine/build.py",
           "    if run.runtime.budget is None and not planned:\n        vars(run.schedule).update(fresh)\n",
           "    vars(run.schedule).update(fresh)\n", BUDGET),
    Mutant("no-checkpoint-at-the-first-validation", "engine/checkpoints.py", "        first = validated and not self.checkpointed\n",
           "        first = False\n", ("tests/test_interrupt.py", "-k", "save_every or sigkill_in_epoch_two")),
    Mutant("divergence-overwrites-last", "engine/loop.py", "            diverged(run, epoch, error)\n",
           "            save(run, epoch)\n", BUDGET),
    Mutant("stop-writes-no-results", "engine/loop.py", '        write_results(run, f"{reason}: {where}", epoch)\n', "",
           ("tests/test_interrupt.py", "-k", "sigterm_mid_epoch")),
    # issue 23: runs never overwrite each other, a trainer that talks
    Mutant("new-run-overwrites-a-run", "engine/checkpoints.py",
           "    found = holds_a_run(out) if not resume and out.is_dir() else []\n", "    found = []\n",
           ("tests/test_run_folder.py", "-k", "second_run")),
    Mutant("no-whole-run-estimate", "engine/run.py",
           "            self.tell((time.perf_counter() - self.first_step_end) / (self.steps - 1))\n", "",
           ("tests/test_run_folder.py", "-k", "says_what")),
    Mutant("tensorboard-without-per-class-iou", "engine/report.py",
           '            board.add_scalar(f"val_iou/{name}", row[f"iou_{name}"], epoch)\n', "            pass\n",
           ("tests/test_run_folder.py", "-k", "tensorboard")),
    Mutant("predict-ignores-the-checkpoint-table", "inference.py",
           '    if class_dict is None and saved is not None and "colors" in saved:\n', "    if False:\n",
           ("tests/test_predict.py", "-k", "own_classes")),
    Mutant("cpu-autocast-off", "devices.py", '    return torch.bfloat16 if cpu_native_bf16() else None\n', "    return None\n",
           ("tests/test_fast_path.py", "-k", "bf16_cpu")),
    Mutant("loss-in-bf16", "engine/loss.py", "main = self.total(logits.float(), labels)",
           "main = self.total(logits, labels)", ("tests/test_fast_path.py", "-k", "bf16_cpu")),
    # dataset.py --download on an existing folder, and where the real-data tests find CamVid
    Mutant("download-ignores-a-complete-camvid", "camvid/download.py",
           '        if not problems:\n            print(f"{destination} already holds',
           '        if False:\n            print(f"{destination} already holds', DOWNLOAD),
    Mutant("download-into-any-folder", "camvid/download.py",
           "        if not destination.is_dir() or any(destination.iterdir()):\n", "        if False:\n", DOWNLOAD),
    Mutant("complete-camvid-needs-the-full-test-split", "camvid/layout.py",
           'len(pairs) <= expected if split == "test"', 'len(pairs) == expected if split == "test"', DOWNLOAD),
    Mutant("failed-download-leaves-its-partial-folder", "camvid/download.py",
           "        shutil.rmtree(scratch, ignore_errors=True)\n", "        pass\n", DOWNLOAD),
    Mutant("real-data-tests-ignore-data-camvid", "tests/conftest.py",
           "    return str(local) if local.is_dir() and not camvid_contents(local)[1] else None\n",
           "    return None\n", DOWNLOAD),
    # the scale a checkpoint was trained at, in test.py, predict.py and the ONNX file
    Mutant("model-run-at-the-label-scale", "inference.py",
           "return scale if scale is not None else downscale / self.downscale",
           "return scale if scale is not None else 1.0", SCALE),
    Mutant("training-scale-not-read", "inference.py",
           'saved_flags(state).get("downscale") or 1.0', "1.0", SCALE),
    Mutant("onnx-training-scale-not-read", "inference.py",
           'parse_factor(model.metadata.get("downscale", 1.0), weights)', "1.0", SCALE),
    # the scale a checkpoint is run at beyond its training scale (train.py --test-scale)
    Mutant("test-scale-ignored", "inference.py", "downscale / self.downscale * self.test_scale",
           "downscale / self.downscale", SCALE),
    Mutant("test-scale-not-read", "inference.py",
           'saved_flags(state).get("test_scale") or 1.0', "1.0", SCALE),
    Mutant("onnx-test-scale-not-read", "inference.py",
           'parse_factor(model.metadata.get("test_scale", 1.0), weights, "test scale")', "1.0", SCALE),
    Mutant("validation-ignores-the-test-scale", "engine/loop.py",
           "run.runtime,\n                    run.settings.data.test_scale)", "run.runtime)", SCALE),
    Mutant("test-scale-unchecked", "train.py", "    if not 0 < args.test_scale <= 8:\n", "    if False:\n", SCALE),
    Mutant("warm-up-ignores-the-test-scale", "engine/warmup.py", "runtime.channels_last, data.test_scale)",
           "runtime.channels_last)", ("tests/test_loop.py", "-k", "warm_up")),
    Mutant("val-samples-ignore-the-test-scale", "engine/loop.py",
           "runtime.channels_last,\n                              run.settings.data.test_scale)",
           "runtime.channels_last)", ("tests/test_loop.py", "-k", "val_samples")),
    Mutant("export-drops-the-test-scale", "export.py", '            "test_scale": str(test_scale),\n', "",
           ("tests/test_export.py", "-k", "metadata or onnx_runtime_equal")),
    Mutant("tta-softmax-after-the-resize", "inference.py",
           "            probabilities = self.view(images, self.scale * factor).softmax(1)\n",
           "            probabilities = self.forward(images, self.scale * factor).softmax(1)\n",
           ("tests/test_inference.py", "-k", "tta")),
    Mutant("predictions-break-ties-last", "inference.py", "    return scores.max(1).indices\n",
           "    return scores.shape[1] - 1 - scores.flip(1).max(1).indices\n",
           ("tests/test_inference.py", "-k", "predicted_classes")),
    Mutant("predict-ignores-the-training-scale", "predict.py", "trained.input_scale(scale=args.scale)",
           "args.scale or 1.0", SCALE),
    Mutant("export-drops-the-training-scale", "export.py", ' "downscale": str(downscale),', "",
           ("tests/test_export.py", "-k", "metadata")),
    Mutant("export-failure-is-a-traceback", "export.py", "        raise UserError(export_failure(error, args.exporter)) from error\n",
           "        raise\n", ("tests/test_export.py", "-k", "exporter_that_fails")),
    Mutant("help-hides-defaults", "cfg.py", "        return super()._get_help_string(action)\n",
           '        return action.help or ""\n', ("tests/test_docs.py", "-k", "help")),
    # model initialisation
    Mutant("bilinear-kernel-off-centre", "fcn.py", "center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5",
           "center = factor - 1", ("tests/test_model.py",)),
    Mutant("upsampler-not-bilinear", "fcn.py",
           "        layer.weight.copy_(bilinear_kernel(channels, channels, 2 * stride))\n", "        pass\n",
           ("tests/test_model.py",)),
    Mutant("scores-not-zero", "fcn.py", "    nn.init.zeros_(layer.weight)\n", "", RECIPE),
    # resume and ranks
    Mutant("val-shards-padded", "dataset.py", "self.indices = list(range(rank, length, num_replicas))",
           "self.indices = list(range(rank, length + length % num_replicas, num_replicas))",
           ("tests/test_distributed.py", "-k", "shards")),
    Mutant("resume-forgets-schedule", "engine/build.py",
           '    run.scheduler.load_state_dict(state["scheduler"])  # a saved Schedule\'s fields come back with it\n',
           "",
           RESUME),
    Mutant("resume-forgets-optimizer", "engine/build.py", '    load_optimizer_state(run.optimizer, state["optimizer"])\n', "",
           RESUME),
    Mutant("bn-buffers-not-synced", "engine/loop.py", "            torch.distributed.broadcast(buffer, src=0)\n",
           "            pass\n", ("tests/test_distributed.py", "-k", "gloo")),
    # backbones: each wiring of the FCN head onto a classifier
    Mutant("resnet-skip-from-layer1", "fcn.py", 'RESNET = Backbone(("layer2", "layer3", "layer4"), None)',
           'RESNET = Backbone(("layer1", "layer3", "layer4"), None)', BACKBONES),
    Mutant("mobilenet-skip-not-the-deepest-block", "fcn.py", '("features.6", "features.12", "features.16")',
           '("features.5", "features.12", "features.16")', BACKBONES),
    Mutant("vgg-skips-from-pool2-and-pool3", "fcn.py", "return pools[2], pools[3], pools[4]",
           "return pools[1], pools[2], pools[4]", BACKBONES),
    Mutant("upsampler-not-bilinear", "fcn.py", "        layer.weight.copy_(bilinear_kernel(channels, channels, 2 * stride))\n",
           "        nn.init.normal_(layer.weight, std=0.01)\n", BACKBONES),
    Mutant("stride-16-skip-dropped", "fcn.py", 'score = self.upscore2(score) + self.score_pool4(features["16"])',
           "score = self.upscore2(score)", BACKBONES),
    Mutant("score-layers-not-zero", "fcn.py", "    nn.init.zeros_(layer.weight)\n", "", BACKBONES),
    Mutant("pretrained-hidden-layers-not-copied", "fcn.py",
           "    return f\"{sources[layer]}.{kind}\" if layer in sources else None",
           "    return None", ("tests/test_backbones.py", "-k", "pretrained")),
    Mutant("pretrained-accepts-extra-keys", "fcn.py",
           '    problems += [f"unexpected {key}" for key in state if key not in expected]\n', "",
           ("tests/test_backbones.py", "-k", "pretrained")),
    # the CPU recipe as the docs and the README's main command promise it
    Mutant("cpu-recipe-differs-from-its-docs", "engine/recipes.py", 'lr=0.1, warmup_epochs=2, epochs=1000',
           'lr=0.05, warmup_epochs=2, epochs=1000', ("tests/test_recipe.py", "-k", "docs_list")),
    Mutant("auto-recipe-is-the-gpu-one-on-a-cpu", "train.py", 'return "camvid" if cuda else "camvid-cpu"',
           'return "camvid"', ("tests/test_download.py", "-k", "quick_start")),
    # the accuracy options (issue 31)
    Mutant("ema-never-updates", "engine/ema.py", "        torch._foreach_lerp_(averages, trained, 1 - decay)\n", "",
           LEVERS + ("-k", "ema or average")),
    Mutant("ema-buffers-not-averaged", "engine/ema.py", "for name, average in self.model.state_dict().items():",
           "for name, average in self.model.named_parameters():", LEVERS + ("-k", "average_follows")),
    Mutant("ema-decay-without-warm-up", "engine/ema.py", "decay = min(self.decay, (1 + self.updates) / (10 + self.updates))",
           "decay = self.decay", LEVERS + ("-k", "average_follows")),
    Mutant("best-pth-of-the-trained-weights", "engine/run.py",
           "return self.runtime.average.model if self.runtime.average is not None else unwrap(self.model)",
           "return unwrap(self.model)", LEVERS + ("-k", "ema")),
    Mutant("ema-not-restored-on-resume", "engine/build.py", '        run.runtime.average.load_state_dict(state["ema"])',
           "        pass",
           RESUME),
    Mutant("aux-loss-ignored", "engine/loss.py", "total = total + aux_weight * self.total(scores.float(), labels)",
           "total = total", LEVERS + ("-k", "aux")),
    Mutant("aux-loss-on-the-final-output", "engine/loss.py",
           "total = total + aux_weight * self.total(scores.float(), labels)",
           "total = total + aux_weight * self.total(logits.float(), labels)", LEVERS + ("-k", "aux")),
    Mutant("aux-outputs-not-cropped", "fcn.py", "        return logits, [crop_to(F.interpolate(",
           "        return logits, [(lambda x, h, w: x)(F.interpolate(", LEVERS + ("-k", "aux")),
    Mutant("class-weight-cap-ignored", "engine/loss.py",
           "weights = weights.clamp(max=cap) if cap is not None else weights", "weights = weights",
           LEVERS + ("-k", "cap")),
    Mutant("class-weight-cap-not-passed", "train.py", "LossSettings(args.class_weights, args.class_weight_cap or None,",
           "LossSettings(args.class_weights, None,",
           LEVERS + ("-k", "cap_reaches")),
    Mutant("class-weight-power-ignored", "engine/loss.py", "weights = balanced.pow(power)", "weights = balanced",
           LEVERS + ("-k", "power")),
    Mutant("class-weight-power-not-passed", "engine/build.py", "settings.class_weight_power)", "1.0)",
           LEVERS + ("-k", "power")),
    Mutant("classifier-head-kept-in-the-trace", "fcn.py", "        drop_head(network, self.taps)\n", "",
           ("tests/test_model.py", "-k", "cycle_collector")),
    Mutant("vgg-head-allocated", "fcn.py", 'with torch.device("meta"):  # the head', 'with torch.device("cpu"):  # the head',
           ("tests/test_model.py", "-k", "never_allocated")),
    Mutant("vgg-init-skipped", "fcn.py", "        return models.VGG(features)\n",
           "        return models.VGG(features, init_weights=False)\n", ("tests/test_model.py", "-k", "never_allocated")),
    Mutant("fused-only-on-cuda", "engine/build.py", 'FUSED_DEVICES = ("cuda", "cpu")', 'FUSED_DEVICES = ("cuda",)',
           ("tests/test_loop.py", "-k", "fused")),
    Mutant("onnxruntime-usage-events-on", "onnx_backend.py", '    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")\n', "",
           ("tests/test_export.py", "-k", "usage_events")),
    Mutant("pace-closure-keeps-the-run", "engine/loop.py", "        run.runtime.pace.tell = None", "        pass",
           ("tests/test_loop.py", "-k", "freed")),
    Mutant("ranks-agree-every-step", "engine/control.py", "progress.steps % runtime.log_every == 0", "True",
           ("tests/test_gpu.py", "-k", "ranks_agree")),
    Mutant("train-splits-ignored", "engine/build.py", "CamVidDataset(data.root, data.train_splits, table",
           'CamVidDataset(data.root, "train", table', LEVERS + ("-k", "training_on_val")),
    Mutant("a-stem-in-two-splits-allowed", "camvid/layout.py", "            if pair[0] in seen:\n",
           "            if False:\n", LEVERS + ("-k", "two_splits")),
    Mutant("best-pth-not-the-last-epoch", "engine/loop.py", "    if improved or run.settings.keep_last:\n",
           "    if improved:\n",
           LEVERS + ("-k", "training_on_val")),
    # the loop at benchmark speed (issue 32): warm-up before the measured epoch, validation cadence, peak memory
    Mutant("warm-up-leaves-bn-statistics-moved", "engine/warmup.py", "            buffer.copy_(saved)\n",
           "            pass\n", ("tests/test_loop.py", "-k", "warm_up_meets")),
    Mutant("warm-up-skips-the-last-batch", "engine/warmup.py",
           "    return sorted({min(batch, samples), samples % batch} - {0}, reverse=True)",
           "    return [min(batch, samples)]", ("tests/test_loop.py", "-k", "batch_sizes or warm_up_meets")),
    Mutant("warm-up-never-runs", "engine/loop.py", "    if warm_up(run) and run.is_main:\n",
           "    if False and run.is_main:\n", ("tests/test_loop.py", "-k", "before_the_first")),
    Mutant("auto-cadence-ignores-the-costs", "engine/run.py",
           "every = max(1, math.ceil(val_seconds / (self.share * train_seconds)))", "every = self.every",
           ("tests/test_loop.py", "-k", "auto_cadence")),
    Mutant("cadence-ignored-by-the-loop", "engine/loop.py", "or run.cadence.due(epoch) else None",
           "or True else None", ("tests/test_interrupt.py", "-k", "save_every")),
    Mutant("test-py-calls-trained-splits-held-out", "test.py", "    if args.split in trained.train_splits:\n",
           "    if False:\n", LEVERS + ("-k", "training_on_val")),
]


def copy_repo(destination: Path) -> None:
    """The files git would see (tracked, and untracked but not ignored) copied into destination."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
    for name in filter(None, listing.split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def apply(root: Path, mutant: Mutant) -> None:
    """Replace the mutant's snippet in the copy; a snippet not found exactly once is a stale mutant."""
    path = root / mutant.file
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise LookupError(f"{mutant.file}: snippet found {count} times (the code changed: update the mutant)")
    path.write_text(text.replace(mutant.original, mutant.replacement))


def pytest(root: Path, tests: tuple[str, ...], timeout: float) -> subprocess.CompletedProcess:
    """pytest -x -q on the copy, one compute thread, no real-data tests."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAMVID_ROOT": "", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def baseline(chosen: list[Mutant], timeout: float) -> bool:
    """The unmutated copy passes every test selection the chosen mutants use (else no kill means anything)."""
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as scratch:
        copy_repo(Path(scratch))
        for tests in dict.fromkeys(mutant.tests for mutant in chosen):
            result = pytest(Path(scratch), tests, timeout)
            if result.returncode != 0:
                print(f"error: {' '.join(tests)} fails without any mutant:\n{result.stdout[-2000:]}", file=sys.stderr)
                return False
    return True


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """'killed', 'survived', 'stale' or 'error' (a pytest crash, a timeout), the seconds it took, and the
    failing test (killed) or the end of pytest's output (otherwise)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as scratch:
        root = Path(scratch)
        copy_repo(root)
        try:
            apply(root, mutant)
        except LookupError as exc:
            return "stale", 0.0, str(exc)
        try:
            result = pytest(root, mutant.tests, timeout)
        except subprocess.TimeoutExpired:
            return "error", time.perf_counter() - started, f"timed out after {timeout:.0f}s"
    # pytest exit codes: 0 all passed, 1 some test failed; anything else is a crash or a collection error
    outcome = {0: "survived", 1: "killed"}.get(result.returncode, "error")
    lines = (result.stdout + result.stderr).strip().splitlines()
    failed = [line for line in lines if line.startswith("FAILED ")]
    return outcome, time.perf_counter() - started, "\n".join(failed[:1] if outcome == "killed" else lines[-5:])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run hand-written mutants against the tests that guard them.")
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true",
                        help="list the mutants and their tests, run nothing (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant (default: %(default)s)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the first run of each test selection on the unmutated copy (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    known = {mutant.name: mutant for mutant in MUTANTS}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        print(f"error: unknown mutant(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = [known[name] for name in args.names] or MUTANTS
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name:36} {mutant.file:26} {' '.join(mutant.tests)}")
        return 0
    if not args.no_baseline and not baseline(chosen, args.timeout):
        return 2
    outcomes = {}
    for mutant in chosen:
        outcome, seconds, detail = run(mutant, args.timeout)
        outcomes[mutant.name] = outcome
        print(f"{outcome:9} {mutant.name:36} {seconds:6.1f}s  ({' '.join(mutant.tests)})", flush=True)
        for line in detail.splitlines():
            print(f"          {line}", flush=True)
    killed = sum(outcome == "killed" for outcome in outcomes.values())
    print(f"score: {killed}/{len(chosen)} killed")
    for name, outcome in outcomes.items():
        if outcome != "killed":
            print(f"  {outcome}: {name}")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
