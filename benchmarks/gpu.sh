#!/usr/bin/env bash
# The GPU tables: every estimator and higher's, torchopt's and a plain autograd full unroll,
# on the three configs at K = 5, 20, 50, one process per config, then the step-product
# formulations (benchmarks/products.py) on each config, then the context manager compiled
# (benchmarks/compiled.py on the sinusoid, K = 5 and 20: compile=True, tasks=4, CUDA graphs by
# compile="reduce-overhead", the compiled functional face and torch.func beside eager Full;
# its first calls compile, a minute or more each with an empty inductor cache). Meant to
# finish within the 15 minutes of a lent GPU (it has not been timed on one yet; each part
# prints its own timing in seconds.txt).
#
# The benchmark sets TF32 off, cudnn.deterministic on and cudnn.benchmark off for its run
# and prints that it did. The error column is computed on the GPU in float32.
#
# Usage (from anywhere):  benchmarks/gpu.sh [OUTDIR]      benchmarks/gpu.sh --help
#   OUTDIR defaults to results/benchmarks/gpu-<UTC time>. It receives, per config,
#   <config>.json, <config>.md and <config>.out (stdout), plus products.json/.md, compiled.json/.md,
#   tables.md (everything) and nvidia-smi.txt.
# PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python3).
# THREADS=... sets the torch CPU threads of every run (default 1, as in the CPU tables).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    -*) echo "benchmarks/gpu.sh: unknown option $1 (the one argument is OUTDIR; --help)" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "benchmarks/gpu.sh: expected at most one argument, OUTDIR (--help)" >&2; exit 2; }

cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
THREADS=${THREADS:-1}
echo "torch CPU threads: $THREADS (THREADS)"
OUT=${1:-results/benchmarks/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT/nvidia-smi.txt"

run() {
    local config=$1
    shift
    local start=$SECONDS
    "$PY" -m benchmarks.estimators --config "$config" --device cuda --K 5 20 50 --repeats 5 --threads "$THREADS" \
        --json "$OUT/$config.json" --markdown "$OUT/$config.md" --no-progress "$@" \
        | tee "$OUT/$config.out"
    echo "$config: $((SECONDS - start)) s" | tee -a "$OUT/seconds.txt"
}

run sinusoid
run omniglot
# The memory-budget rows: Binomial with at most 10 step graphs at once, and with
# max_memory="3GiB" (about 0.4x the 7358 MiB a plain Full unroll took on an H200 at this size).
run miniimagenet --chunk-size 10 --max-memory 3GiB

start=$SECONDS
"$PY" -m benchmarks.products --device cuda --config sinusoid omniglot miniimagenet --batch 20 --threads "$THREADS" \
    --json "$OUT/products.json" | tee "$OUT/products.md"
echo "products: $((SECONDS - start)) s" | tee -a "$OUT/seconds.txt"

start=$SECONDS
# The context manager compiled (and over tasks, with CUDA graphs) against eager Full, the loop as users write it.
"$PY" -m benchmarks.compiled --device cuda --steps 5 20 --repeats 7 --threads "$THREADS" --json "$OUT/compiled.json" \
    --rows eager_full compiled_full compiled_checkpointed eager_tasks_full compiled_tasks_checkpointed \
    compiled_tasks_checkpointed_cudagraphs functional_checkpointed_compiled torch_func_compiled \
    | tee "$OUT/compiled.md"
echo "compiled: $((SECONDS - start)) s" | tee -a "$OUT/seconds.txt"
cat "$OUT/sinusoid.md" "$OUT/omniglot.md" "$OUT/miniimagenet.md" "$OUT/products.md" "$OUT/compiled.md" > "$OUT/tables.md"
echo "Wrote $OUT/tables.md and the JSON beside it (total $SECONDS s)."
