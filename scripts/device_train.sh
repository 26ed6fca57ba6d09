#!/usr/bin/env bash
# Train lite-128 on the device tool's GPU machine (torch only; no Ray/dlib there) and bring the progress back.
#
# Here, first:  python scripts/make_gpu_carry.py --data /tmp/g2face-prepared/lfw-devtrain/shards --out carry --seed N
#               (a new N each lease: another subset of the training faces; the shards fill what the 64 MiB
#               transfer limit leaves after the working tree, the shipped model included)
# Then the device tool:  run(command="bash scripts/device_train.sh 8", carry=["carry"], timeout_s=600)
# The run continues the shipped model (g2face/weights/g2face-lite-128.pt: generator and EMA from it, a fresh
# discriminator, no hiding warm-up), or carry/warm_start/ if one was copied there, or starts from scratch
# with the hiding warm-up when neither exists. Extra arguments go to scripts/train_standalone.py.
# $OUT receives warm_start/ parts (each < 16 MiB), stats.jsonl and the last grid: at most 8 files.
# Rebuild the inference artifact here with g2face.training.artifact_from_warm_start(DIR, PATH).
# To compare several recipes in one lease instead: scripts/device_recipes.py (concurrent runs, held-out figures).
# Full precision (TF32) rather than bf16 autocast: on an H200, lite-128 ran 1447 faces/s in fp32 and 1310 in
# bf16, paper-256 241 and 110 (bench/model_speed.py, batch 32).
set -euo pipefail
minutes=${1:-8}
shift || true
start=(--hiding-warmup-steps 1000 --hiding-warmup-min-psnr 32)
if [ -f carry/warm_start/meta.json ]; then start=(--warm-start carry/warm_start)
elif [ -f g2face/weights/g2face-lite-128.pt ]; then start=(--warm-start g2face/weights/g2face-lite-128.pt); fi
dlib=carry/dlib_resnet_fp16.pt
[ -f "$dlib" ] || dlib=carry/dlib_face_recognition_resnet_model_v1.dat
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "start: ${start[*]}"
train() {  # the run always ends inside the call's limit, so the copies below always happen
  PYTHONUNBUFFERED=1 timeout $((${minutes%.*} * 60 + 75)) python3 scripts/train_standalone.py --data carry/shards \
    --dlib-resnet "$dlib" --config lite-128 --batch 32 \
    --checkpoint-every 200 --grid-every 500 --log-every 50 --device cuda \
    --train-set steps_per_epoch=100 --train-set autocast=false \
    --train-set weights.payload_min_psnr=32 --train-set weights.dissimilar_margin=0.8 \
    --train-set weights.identity_dissimilar=20 --train-set weights.identity_recover=20 \
    --train-set weights.own_identity=5 --out /tmp/run "${start[@]}" "$@"
}
train --minutes "$minutes" "$@" || echo "training stopped with an error (see above); bringing back what it wrote"
cp /tmp/run/warm_start/* "$OUT/" || true
cp /tmp/run/stats.jsonl "$OUT/" || true
last_grid=$(ls /tmp/run/grids/*.png 2>/dev/null | tail -1 || true)
if [ -n "$last_grid" ]; then cp "$last_grid" "$OUT/grid.png"; fi
