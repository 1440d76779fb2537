#!/usr/bin/env bash
# Session-3 GPU measurements (README: Speed, the GPU race, conditional vs unconditional), for a lent GPU machine.
# Run from the repository root with the packed dataset (python tools/pack_dataset.py pack ../shared/UTKFace
# .data/utk64.npz); results land in $OUT, small enough to come back (generator weights in fp16).
#   PART=race: bench.py at 128 px (bf16 and fp32, batch 32 and 256, the gpu64 preset, seed2019, DCGAN-64), then
#              tools/race.py --preset gpu64 --minutes $MIN: progan then DCGAN-64, alone on the GPU, one after the other
#   PART=cond: a conditional (age, gender, race) and an unconditional 64 px run side by side, same steps and batch,
#              EMA generators exported for FID / per-group FID / label fidelity on a CPU machine
# Every piece has its own timeout so that one failure still returns the rest. Measured on an H100: the bench takes
# ~4.5 min and the race ~7 min, so PART=race needs a 10-minute call (or BENCH_S=0 for the race alone).
set -x
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
PART=${PART:-race}
DEV=${DEV:-cuda}
MIN=${MIN:-3}             # race minutes per contestant
BENCH_S=${BENCH_S:-1}     # timed seconds per bench row; 0 skips the bench
STEPS=${STEPS:-2500}      # PART=cond: steps per run (batch 64): 160k images, the diversity ablation's budget
BLOCK=${BLOCK:-200}       # PART=cond: seconds before both runs are stopped (SIGINT: checkpoint, then exit)
mkdir -p "$OUT" /tmp/logs
nvidia-smi --query-gpu=name,memory.total --format=csv || true
[ -d /tmp/utk64 ] || python3 tools/pack_dataset.py unpack .data/utk64.npz /tmp/utk64 > /dev/null

if [ "$PART" = race ] && [ "$BENCH_S" != 0 ]; then
  B="timeout 150 python3 tools/bench.py --device $DEV --seconds $BENCH_S --no-flops --size 128"
  $B --precision bf16 --models default,gpu64,seed2019,dcgan --json /tmp/logs/bench_bf16.json
  $B --precision fp32 --models default,gpu64,dcgan --min-res 64 --json /tmp/logs/bench_fp32.json
  $B --precision bf16 --models default --min-res 64 --batch 256 --json /tmp/logs/bench_bf16_b256.json
  $B --precision fp32 --models default --min-res 64 --batch 256 --json /tmp/logs/bench_fp32_b256.json
fi
if [ "$PART" = race ]; then
  timeout "${RACE_T:-520}" python3 tools/race.py /tmp/utk64 --minutes "$MIN" --device $DEV --preset gpu64 \
    --snapshots 3 --no-score --out /tmp/race 2>&1 | tee /tmp/logs/race.txt
  # fp16 weights: 3 snapshots x 2 contestants x ~14 MB fp32 would not come back; load_state_dict casts them back
  python3 - <<'EOF'
import pathlib, torch
for p in sorted(pathlib.Path("/tmp/race").glob("*/snap-*.pt")):
    obj = torch.load(p, map_location="cpu", weights_only=False)
    half = lambda sd: {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    obj = {**obj, "G_ema": half(obj["G_ema"])} if "G_ema" in obj else half(obj)
    torch.save(obj, p)
EOF
  # files come back only up to 16 MiB each: split (cat race.part* | tar xz to unpack)
  tar czf /tmp/race.tgz -C /tmp race && split -b 15M -d /tmp/race.tgz "$OUT/race.part"
fi

if [ "$PART" = cond ]; then
  T="python3 -m progan train /tmp/utk64 --preset default --size 64 --batch 64 --fade-images 10000 --stable-images 10000 \
     --epochs 1000 --log-every 50 --no-progress --video-every 1000000 --max-steps $STEPS --device $DEV"
  python3 -c "from progan.facedata import load_folder; load_folder('/tmp/utk64', 64, progress=False)"
  timeout -s INT "$BLOCK" $T --out /tmp/runs/cond --condition age,gender,race > /tmp/logs/cond.txt 2>&1 &
  timeout -s INT "$BLOCK" $T --out /tmp/runs/uncond > /tmp/logs/uncond.txt 2>&1 &
  wait
  tail -n 4 /tmp/logs/cond.txt /tmp/logs/uncond.txt
  for r in cond uncond; do
    python3 -m progan export /tmp/runs/$r --out "$OUT/$r.safetensors"
    cp /tmp/runs/$r/log.jsonl /tmp/logs/$r-log.jsonl
  done
fi
tar czf "$OUT/logs-$PART.tgz" -C /tmp logs
ls -la "$OUT"
