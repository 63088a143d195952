#!/usr/bin/env bash
# The GPU figures of the README and docs/results.md in one command on a CUDA machine: bench.py (with a profile of
# the fast train step), then tools/sweep.py's GPU variants, each under one --time-budget and scored on val by
# test.py, then each run scored again at 1.25x its training scale (as --test-scale 1.25 would run it). Everything
# lands in OUT (default results/gpu-figures): bench.json/bench.txt, sweep.md/sweep.json, and each run's small files;
# OUT/figures.tgz is rebuilt after every step, so a run cut short keeps what it measured.
#
#     bash tools/gpu_figures.sh                          # bench (at most 150 s), then the sweep of 3 minutes a run
#     BUDGET=10m RUNS="camvid-ema" bash tools/gpu_figures.sh
#
# Settings by environment:
#   DATA     CamVid folder (default: $CAMVID_ROOT, else data/CamVid)   BENCH_S  bench.py's cap in seconds (150)
#   BUDGET   --time-budget of every sweep run (3m)                     STEPS    "bench sweep scales" (all)
#   RUNS     names from the table below, in order (all)                WORKERS  loader workers (cores - 2, <= 12)
#   SCALES   test.py --scale values of the last step ("1.25"; the GPU variants train at full resolution)
#   OUT      where the files go (results/gpu-figures)                   PY       python3
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-${CAMVID_ROOT:-data/CamVid}}; BENCH_S=${BENCH_S:-150}; BUDGET=${BUDGET:-3m}
STEPS=${STEPS:-bench sweep scales}; SCALES=${SCALES:-1.25}; OUT=${OUT:-results/gpu-figures}; PY=${PY:-python3}
workers=$(( $(nproc) - 2 )); [ "$workers" -gt 12 ] && workers=12; [ "$workers" -lt 1 ] && workers=1
WORKERS=${WORKERS:-$workers}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

# The GPU variants: the recipe, then the accuracy options one by one and together (docs/training.md).
declare -A VARIANT=(
  [camvid]="--recipe camvid"
  [camvid-ema]="--recipe camvid --ema 0.999"
  [camvid-aux]="--recipe camvid --aux-weight 0.4"
  [camvid-mf3]="--recipe camvid --class-weights median-freq --class-weight-cap 3"
  [camvid-levers]="--recipe camvid --ema 0.999 --aux-weight 0.4 --class-weights median-freq --class-weight-cap 3"
  [camvid-compile]="--recipe camvid --compile"
)
ORDER=${RUNS:-camvid camvid-ema camvid-aux camvid-mf3 camvid-levers camvid-compile}

pack() { tar -czf "$OUT/figures.tgz" --exclude='*.pth' --exclude=figures.tgz -C "$OUT" . 2>/dev/null; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null) cores $(nproc) workers $WORKERS budget $BUDGET"
} | tee "$OUT/env.txt"

case " $STEPS " in *" bench "*)
  echo "== bench.py (cap $BENCH_S s)"
  timeout -s TERM -k 15 "$BENCH_S" $PY bench.py --device cuda --data-root "$DATA" --backbones vgg16_bn,resnet50 \
    --no-onnx --repeats 3 --profile 10 --json "$OUT/bench.json" > "$OUT/bench.txt" || echo "bench.py exit $?"
  pack;;
esac
case " $STEPS " in *" sweep "*)
  runs=()
  for name in $ORDER; do runs+=("$name=${VARIANT[$name]:?unknown run $name}"); done
  echo "== tools/sweep.py: ${ORDER} under --time-budget $BUDGET each"
  $PY tools/sweep.py --budget "$BUDGET" --out "$OUT" --device cuda --workers "$WORKERS" --data-root "$DATA" \
    --common "--log-every 50 --save-every 120" "${runs[@]}" || echo "sweep: a run failed (see $OUT/*/sweep.log)"
  pack;;
esac
case " $STEPS " in *" scales "*)
  for name in $ORDER; do
    [ -f "$OUT/$name/best.pth" ] || continue
    for scale in $SCALES; do
      echo "== $name at --scale $scale"
      $PY test.py --weights "$OUT/$name/best.pth" --split val --data-root "$DATA" --device cuda --workers "$WORKERS" \
        --scale "$scale" --json "$OUT/$name/val_scale_$scale.json" 2>&1 | grep -a "images/s\|^MIoU\|error" || echo "test.py exit $?"
    done
  done
  pack;;
esac
echo "== $OUT: $(ls "$OUT" | tr '\n' ' ')"
