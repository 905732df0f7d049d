#!/usr/bin/env bash
# The GPU tables of issue 5 ("The benchmark"): every estimator and higher's, torchopt's and a
# plain autograd full unroll, on the three configs at K = 5, 20, 50, one process per config.
# Meant to finish in under 5 minutes on one H100 or H200 (no GPU was available when it was
# written, so it has not been timed there yet; each config prints its own timing).
#
# The benchmark sets TF32 off, cudnn.deterministic on and cudnn.benchmark off for its run
# and prints that it did. The error column is computed on the GPU in float32.
#
# Usage (from anywhere):  benchmarks/gpu.sh [OUTDIR]
#   OUTDIR defaults to results/benchmarks/gpu-<UTC time>. It receives, per config,
#   <config>.json, <config>.md and <config>.out (stdout), plus tables.md (all three)
#   and nvidia-smi.txt.
# PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-results/benchmarks/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT/nvidia-smi.txt"

run() {
    local config=$1
    shift
    local start=$SECONDS
    "$PY" -m benchmarks.estimators --config "$config" --device cuda --K 5 20 50 --repeats 5 \
        --json "$OUT/$config.json" --markdown "$OUT/$config.md" --no-progress "$@" \
        | tee "$OUT/$config.out"
    echo "$config: $((SECONDS - start)) s" | tee -a "$OUT/seconds.txt"
}

run sinusoid
run omniglot
# The memory-budget rows of issue 5: Binomial with at most 10 step graphs at once, and with
# max_memory="3GiB" (about 0.4x the 7358 MiB Full took in issue 5's H200 prototype; skipped, with a note, where
# Binomial has no max_memory argument yet).
run miniimagenet --chunk-size 10 --max-memory 3GiB

cat "$OUT/sinusoid.md" "$OUT/omniglot.md" "$OUT/miniimagenet.md" > "$OUT/tables.md"
echo "Wrote $OUT/tables.md and the JSON beside it (total $SECONDS s)."
