"""train.py's command line is a contract: every flag, its default and what each recipe resolves to are those
recorded in tests/train_flags.json (update that file when a flag or a recipe changes on purpose), and the typed
settings the engine receives hold exactly the flags' values."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import train
from engine.settings import DataSettings, LossSettings, ModelSettings, OptimSettings, RunSettings

RECORDED = json.loads((Path(__file__).with_name("train_flags.json")).read_text())
RECIPE_ARGV = {"none": [], "camvid": ["--recipe", "camvid"], "camvid-cpu": ["--recipe", "camvid-cpu"]}


def as_json(args) -> dict:
    return json.loads(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}))


@pytest.mark.parametrize("recipe", sorted(RECIPE_ARGV))
def test_flags_and_recipes_resolve_as_recorded(recipe):
    assert as_json(train.parse_args(RECIPE_ARGV[recipe] + ["--data-root", "data/CamVid"])) == RECORDED[recipe]


def test_settings_hold_the_flags(camvid):
    argv = ["--data-root", str(camvid), "--recipe", "camvid-cpu", "--train-splits", "train,val", "--ema", "0.99",
            "--aux-weight", "0.3", "--class-weights", "median-freq", "--class-weight-cap", "0", "--time-budget", "2m",
            "--eval-every", "auto"]
    args = train.parse_args(argv)
    settings = train.settings_from_args(args)
    flags = vars(args)
    for group in (settings.data, settings.model, settings.optim, settings.loss, settings.run):
        for field in dataclasses.fields(group):
            name = {"root": "data_root", "variant": "model"}.get(field.name, field.name)
            value = getattr(group, field.name)
            if name in ("train_splits", "crop_size", "scale", "time_budget", "class_weight_cap", "label_cache",
                        "data_root", "class_dict", "out", "eval_every"):
                continue  # parsed or resolved: checked below
            assert value == flags[name], name
    assert settings.data.train_splits == ("train", "val") and settings.data.crop_size == (88, 120)
    assert settings.data.scale == (0.5, 2.0) and settings.run.time_budget == 120.0
    assert settings.loss.class_weight_cap is None  # 0: uncapped
    assert settings.run.eval_every is None  # auto: the cadence follows the measured costs
    assert settings.run.out == Path("weights/camvid-cpu") and settings.data.class_dict == camvid / "class_dict.csv"
    assert settings.flags["train_splits"] == "train,val" and settings.flags["out"] == "weights/camvid-cpu"


def test_the_settings_defaults_are_train_pys(camvid):
    """bench.py builds the recipe's transform and the optimizer from the settings' defaults: they must be the
    parser's (the loader's workers and the label cache folder depend on the machine)."""
    settings = train.settings_from_args(train.parse_args(["--data-root", str(camvid)]))
    plain = {DataSettings: DataSettings(settings.data.root, settings.data.class_dict), ModelSettings: ModelSettings(),
             OptimSettings: OptimSettings(), LossSettings: LossSettings(), RunSettings: RunSettings(settings.run.out)}
    for group in (settings.data, settings.model, settings.optim, settings.loss, settings.run):
        default = plain[type(group)]
        differ = [f.name for f in dataclasses.fields(group) if getattr(group, f.name) != getattr(default, f.name)]
        assert differ == (["workers", "label_cache"] if isinstance(group, DataSettings) else []), type(group)
