#!/usr/bin/env bash
# Train lite-128 on the device tool's GPU machine (torch only; no Ray/dlib there) and bring the progress back.
#
# Here, first:  python scripts/make_gpu_carry.py --data /tmp/g2face-prepared/lfw-devtrain/shards --out carry
#               (optionally copy a previous run's warm_start/ files into carry/warm_start/ and lower --max-mib:
#               generator + discriminator without the EMA parts are ~31 MiB, and the carry limit is 64 MiB)
# Then the device tool:  run(command="bash scripts/device_train.sh 8", carry=["carry"], timeout_s=600)
# $OUT receives warm_start/ parts (each < 16 MiB), stats.jsonl and the last grid: at most 8 files.
# Rebuild the inference artifact here with g2face.training.artifact_from_warm_start(DIR, PATH).
set -euo pipefail
minutes=${1:-8}
shift || true
warm=()
if [ -f carry/warm_start/meta.json ]; then warm=(--warm-start carry/warm_start); fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# GPU inference speed of the model library (random weights; issue 4's CUDA figures), printed again at the end
# because $OUT holds at most 8 files and the reply shows only the tail of the output.
PYTHONPATH=. timeout 75 python3 bench/model_speed.py --no-cpu --iters 5 > /tmp/model_speed.txt 2>&1 || true
PYTHONUNBUFFERED=1 python3 scripts/train_standalone.py --data carry/shards \
  --dlib-resnet carry/dlib_face_recognition_resnet_model_v1.dat --config lite-128 --batch 32 \
  --minutes "$minutes" --checkpoint-every 200 --grid-every 500 --log-every 50 --device cuda \
  --train-set steps_per_epoch=100 --hiding-warmup-steps 1000 --hiding-warmup-min-psnr 32 --train-set weights.payload_min_psnr=32 --out /tmp/run "${warm[@]}" "$@"
cp /tmp/run/warm_start/* "$OUT/"
cp /tmp/run/stats.jsonl "$OUT/"
last_grid=$(ls /tmp/run/grids/*.png 2>/dev/null | tail -1 || true)
if [ -n "$last_grid" ]; then cp "$last_grid" "$OUT/grid.png"; fi
cat /tmp/model_speed.txt
