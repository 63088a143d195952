"""The documented recipes: flag defaults that `train.py --recipe NAME` sets (explicit flags still win), keyed by
train.py's option names (train.py refuses a key that is not one)."""
from __future__ import annotations

# `--recipe camvid`: the defaults chosen for CamVid.
RECIPES = {
    "camvid": dict(optimizer="sgd", lr=0.01, weight_decay=5e-4, schedule="poly", warmup_epochs=5,
                   epochs=300, batch_size=8, scale=(0.5, 2.0), flip=True, jitter=0.2, clip_grad=10.0),
}
# The CamVid recipe for an hour of a CPU, chosen by short runs scored at 360x480 (docs/results.md):
# MobileNetV3-Large at quarter resolution saw the most epochs and scored best, with a 10x higher lr. Its depthwise
# convolutions train faster in fp32 than in CPU bf16, and the decoded images fit in memory (--cache). Square-root
# median-frequency weights lift the rare classes without costing Building much; with the weight average and deep
# supervision on top they scored 0.586 in an hour against 0.568 without the three. Run at 1.25x the training scale
# (the mean of its random scaling), five such models scored 0.003-0.026 more on val than at 1x, none less.
RECIPES["camvid-cpu"] = dict(RECIPES["camvid"], backbone="mobilenet_v3_large", downscale=4.0, crop_size=[88, 120],
                             lr=0.1, warmup_epochs=2, epochs=1000, eval_every="auto", time_budget="60m", amp=False,
                             cache=True, class_weights="median-freq", class_weight_power=0.5, ema=0.999,
                             aux_weight=0.4, test_scale=1.25)
RECIPE_NOTES = {"camvid": "the full recipe for a CUDA GPU (FCN-8s on VGG16-BN at CamVid's full resolution, 300 epochs)",
                "camvid-cpu": "the recipe for a machine without a CUDA GPU (FCN-8s on MobileNetV3-Large, 60 minutes at "
                              "quarter resolution)"}
