#!/usr/bin/env bash
# Renders README's pictures and videos from a trained run with progan's own commands.
#   bash tools/showcase.sh runs/utk64
set -euo pipefail
RUN=${1:-runs/utk64}
mkdir -p docs videos
progan generate "$RUN" --n 64 --seed 1 --cols 16 --out docs/faces.png --no-progress
progan interpolate "$RUN" --out videos/interpolation.mp4 --keys 8 --frames-per-key 36 --grid 4x2 --seed 2 --no-progress
progan timelapse "$RUN" --out videos/training.mp4 --seconds 40 --width 512
progan inspect "$RUN" | head -8
ls -la docs videos
