#!/usr/bin/env bash
# The GPU measurements in README, as one script for a lent GPU machine (run from the repository root; results land
# in $OUT). The dataset travels packed: python tools/pack_dataset.py pack ../shared/UTKFace .data/utk64.npz
#   1. bench.py at 128 px, bf16 and fp32 (batch 32, the default) and the default at batch 128; DDP wrapping cost
#   2. at the same time, on the same GPU (fixed image budgets, so sharing the GPU changes only their wall-clock):
#      a conditional 64 px UTKFace run, the diversity ablation (on/off, equal steps) and the stacked-digits
#      mode-coverage benchmark (diversity 0 and 1, 3 seeds)
#   3. EMA generators exported (safetensors), scored for FID/SWD on a CPU machine with the Inception weights.
set -x
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
BLOCK=${BLOCK:-240}   # seconds for the concurrent block
mkdir -p "$OUT" /tmp/logs
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 tools/pack_dataset.py unpack .data/utk64.npz /tmp/utk64 > /dev/null
B="timeout 100 python3 tools/bench.py --device cuda --size 128 --seconds 1 --no-flops"
$B --precision bf16 --json /tmp/logs/bench_bf16.json
$B --precision fp32 --models default --min-res 64 --json /tmp/logs/bench_fp32.json
$B --precision bf16 --models default --min-res 64 --batch 128 --json /tmp/logs/bench_bf16_b128.json
$B --precision fp32 --models default --min-res 64 --batch 128 --json /tmp/logs/bench_fp32_b128.json
timeout 60 python3 -m torch.distributed.run --nproc_per_node 1 tools/ddp_bench.py --device cuda --size 64 --batch 32 --seconds 2 2>&1 | tail -12

T="python3 -m progan train /tmp/utk64 --preset default --size 64 --batch 64 --fade-images 10000 --stable-images 10000 --epochs 1000 \
   --log-every 50 --no-progress --cache-dir /tmp/cache"
python3 -c "from progan.facedata import load_folder; load_folder('/tmp/utk64', 64, cache_dir='/tmp/cache', progress=False)"
timeout -s INT $BLOCK $T --out /tmp/runs/cond64 --condition age,gender,race --video-every 1000000 > /tmp/logs/cond64.txt 2>&1 &
timeout -s INT $BLOCK $T --out /tmp/runs/div1 --diversity 1 --max-steps 2500 --video-every 50 > /tmp/logs/div1.txt 2>&1 &
timeout -s INT $BLOCK $T --out /tmp/runs/div0 --diversity 0 --max-steps 2500 --video-every 50 > /tmp/logs/div0.txt 2>&1 &
for d in 0 1; do
  timeout -s INT $BLOCK python3 tools/mode_coverage.py --device cuda --seeds 3 --diversity $d --budget-images 80000 \
    --n-eval 10000 --work-dir /tmp/mc --out /tmp/logs/mc$d.json --no-progress > /tmp/logs/mc$d.txt 2>&1 &
done
wait
tail -3 /tmp/logs/*.txt
for r in cond64 div1 div0; do
  python3 -m progan export /tmp/runs/$r --out "$OUT/$r.safetensors"
  cp /tmp/runs/$r/log.jsonl /tmp/logs/$r-log.jsonl; cp /tmp/runs/$r/cellcolours.jsonl /tmp/logs/$r-cellcolours.jsonl
done
python3 -m progan generate /tmp/runs/cond64 --grid age=5:85:9,race --seed 4 --out /tmp/logs/cond-table.png --no-progress
tar czf "$OUT/logs.tgz" -C /tmp logs
ls -la "$OUT"
