#!/usr/bin/env bash
# The 128 px GPU run of README ("128 px on one H100"), for a lent GPU machine with ~10 minutes of command time.
# Run from the repository root with the packed dataset, made on the CPU machine by
#   python tools/pack_dataset.py pack ../shared/UTKFace .data/utk128.npz --size 128 --format webp   (43 MiB)
#   1. tools/race.py --size 128 --contestants progan --preset gpu128: progan alone on the GPU for $MIN minutes of
#      wall-clock, the EMA generator saved every minute; weights brought back in fp16 (8 x 7 MB) and scored for
#      FID/SWD on the CPU machine (`python tools/race.py score race128/ --real ../shared/UTKFace --n 1000`)
#   2. in the time left, the gpu128 row of the speed table (tools/bench.py, bf16)
# Every piece has its own timeout, so that one failure still returns the rest; the whole stays under LIMIT seconds.
set -x
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
DEV=${DEV:-cuda}
MIN=${MIN:-8}              # training minutes
SNAPS=${SNAPS:-8}          # snapshots (one per minute)
RACE_T=${RACE_T:-540}      # seconds before the run is cut off (its snapshots so far stay scorable)
LIMIT=${LIMIT:-585}        # seconds for the whole script
PACK=${PACK:-.data/utk128.npz}
mkdir -p "$OUT" /tmp/logs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch; print('torch', torch.__version__)"
python3 tools/pack_dataset.py unpack "$PACK" /tmp/utk128
nvidia-smi dmon -s um -d 15 > /tmp/logs/dmon.txt 2>&1 &
DMON=$!
timeout "$RACE_T" python3 tools/race.py /tmp/utk128 --size 128 --contestants progan --preset gpu128 \
  --minutes "$MIN" --snapshots "$SNAPS" --device "$DEV" --no-score --out /tmp/race128 2>&1 | tee /tmp/logs/race128.txt
kill $DMON 2>/dev/null
# fp16 weights: 8 snapshots x 14 MB fp32 would not come back; progan's loaders cast them back to fp32
python3 - <<'EOF'
import pathlib, torch
for p in sorted(pathlib.Path("/tmp/race128").glob("*/snap-*.pt")):
    obj = torch.load(p, map_location="cpu", weights_only=False)
    obj["G_ema"] = {k: (v.half() if v.is_floating_point() else v) for k, v in obj["G_ema"].items()}
    torch.save(obj, p)
EOF
# files come back only up to 16 MiB each: split (cat race128.part* | tar x to unpack)
tar cf /tmp/race128.tar -C /tmp race128 && split -b 15M -d /tmp/race128.tar "$OUT/race128.part"
LEFT=$((LIMIT - SECONDS - 10))
if [ "$LEFT" -gt 25 ]; then
  timeout "$LEFT" python3 tools/bench.py --device "$DEV" --size 128 --seconds 1 --no-flops --precision bf16 \
    --models gpu128 --json /tmp/logs/bench_gpu128.json 2>&1 | tail -n 12
fi
tar czf "$OUT/logs.tgz" -C /tmp logs
ls -la "$OUT"
