#!/usr/bin/env bash
# The GPU measurements in README, as one script for a lent GPU machine (run from the repository root; results
# land in $OUT). The dataset travels packed: python tools/pack_dataset.py pack ../shared/UTKFace .data/utk64.npz --quality 90
#   bench (bf16 and fp32, up to 128 px) and a UTKFace 64 px training run stopped with SIGINT after TRAIN_SECONDS.
set -x
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
TRAIN_SECONDS=${TRAIN_SECONDS:-270}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch; print(torch.__version__)"
python3 tools/pack_dataset.py unpack .data/utk64.npz /tmp/utk64
timeout 150 python3 tools/bench.py --device cuda --precision bf16 --size 128 --seconds 1.5 --json "$OUT/bench_bf16.json"
timeout 120 python3 tools/bench.py --device cuda --precision fp32 --size 128 --seconds 1 --no-flops --json "$OUT/bench_fp32.json"
timeout -s INT "$TRAIN_SECONDS" python3 -m progan train /tmp/utk64 --out /tmp/runs/gpu64 --size 64 --epochs 1000 \
    --batch 64 --fade-images 60000 --stable-images 60000 --video-every 1000000 --log-every 100 --no-progress \
    --cache-dir /tmp/cache
python3 -m progan export /tmp/runs/gpu64 --out "$OUT/gpu64.safetensors"
cp /tmp/runs/gpu64/log.jsonl "$OUT/gpu64-log.jsonl"
python3 -m progan generate /tmp/runs/gpu64 --n 64 --seed 1 --out "$OUT/gpu64-faces.png" --no-progress
ls -la "$OUT"
