#!/usr/bin/env bash
# anyshape's training step against a plain transformers loop on one H200 (bench/train_speed.py):
# SmolLM2-135M and SmolLM2-1.7B configs (random weights), 16 x 1024 tokens per step, bf16 autocast,
# 25 steps of which the last 17 are timed, anyshape with and without --compile, and the 135M
# config's sandwich of 4 Shapes per step, eager and compiled (the graphs compiled during the timed
# steps are printed: 0 unless new widths recompile).
# About 4 minutes (8 at most); writes train_speed-*.json to $OUT (default bench/results).
#
#     PYTHONPATH=. bash bench/gpu_check.sh        # from the repository root
set -euo pipefail
OUT="${OUT:-bench/results}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p "$OUT"
common=(--device cuda --seq-len 1024 --batch 16 --precision bf16 --steps 25 --warmup 8 --peak-tflops 989)
"$PYTHON" bench/train_speed.py --configs smollm2-135m --sandwich 4 --compile "${common[@]}" --out "$OUT/train_speed-smollm2-135m.json"
"$PYTHON" bench/train_speed.py --configs smollm2-1.7b --compile "${common[@]}" --out "$OUT/train_speed-smollm2-1.7b.json"
