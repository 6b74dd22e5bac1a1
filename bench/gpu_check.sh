#!/usr/bin/env bash
# One command for a GPU machine: install, GPU tests, memcheck, layer and model benchmarks.
#
#   OUT=/some/folder bash bench/gpu_check.sh
#
# Made for a machine with torch >= 2.11, triton >= 3.6, nvcc and no package registry. Every step
# runs under `timeout`, against one overall budget (FASTRES_CHECK_BUDGET seconds, default 470, so
# the whole check ends inside 8 minutes); a failed step does not stop the next, but the script
# exits non-zero if any step failed. Results go to $OUT (default /tmp/fastres-gpu-check), copied
# to bench/results/<date>-<card>/. A short summary is printed last.
#
# Knobs (environment):
#   FASTRES_CHECK_BUDGET      overall seconds (default 470)
#   FASTRES_CHECK_MODELS      model-level models, comma list (default: all five, resnet50 first)
#   FASTRES_CHECK_MODES       train,infer (default both)
#   FASTRES_CHECK_LAYER_ARGS  extra `fastres bench` arguments for the layer step, e.g.
#                             "--compile --compile-modes default --layer-limit 6" for
#                             torch.compile baselines on the first 6 shapes of each model
#   FASTRES_CHECK_SKIP        steps to skip, comma list: install,tests,sanitizer,layers,models
#   FASTRES_CHECK_INSTALL_SECS, FASTRES_CHECK_TESTS_SECS, FASTRES_CHECK_SANITIZER_SECS
#                             per-step caps (default 240, 150, 90), always within the budget
#   PYTHON                    interpreter (default python3)

set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/fastres-gpu-check}"
mkdir -p "$OUT"
BUDGET="${FASTRES_CHECK_BUDGET:-470}"
MODELS="${FASTRES_CHECK_MODELS:-resnet50,resnext50_32x4d,wide_resnet50_2,resnet18,preact_resnet50}"
MODES="${FASTRES_CHECK_MODES:-train,infer}"
SKIP=",${FASTRES_CHECK_SKIP:-},"
START=$(date +%s)
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

STEPS=()     # "name|status|seconds" in order
FAILED=0

remaining() { echo $(( BUDGET - ( $(date +%s) - START ) )); }

# run_step NAME MAX_SECONDS LOGFILE COMMAND...: run under timeout min(MAX, what is left)
run_step() {
    local name="$1" max="$2" log="$3"; shift 3
    local left; left=$(remaining)
    if [[ "$SKIP" == *",$name,"* ]]; then
        STEPS+=("$name|skipped (FASTRES_CHECK_SKIP)|0"); return 0
    fi
    if (( left < 15 )); then
        STEPS+=("$name|skipped (budget spent)|0"); FAILED=1; return 0
    fi
    local limit=$(( max < left ? max : left ))
    local t0; t0=$(date +%s)
    echo "=== [$name] (limit ${limit}s): $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    tail -n 25 "$log"
    local status="ok"
    if (( rc == 124 || rc == 137 )); then status="TIMEOUT after ${limit}s"; FAILED=1
    elif (( rc != 0 )); then status="FAILED (exit $rc)"; FAILED=1; fi
    STEPS+=("$name|$status|$dt")
    echo "=== [$name] $status in ${dt}s"
}

SETUP_LOG="$OUT/setup.log"
GPU_LINE="no nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    GPU_LINE=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)
fi
NVCC_LINE="no nvcc on PATH"
command -v nvcc >/dev/null 2>&1 && NVCC_LINE=$(nvcc --version 2>&1 | tail -n 1)
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "gpu: $GPU_LINE"
    echo "nvcc: $NVCC_LINE"
} >"$SETUP_LOG"

# CUDA_HOME: the toolkit root holding include/cuda_runtime.h (nvcc on PATH may be a wrapper)
if [[ -z "${CUDA_HOME:-}" ]]; then
    for cand in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")")" \
                /usr/local/cuda /usr/local/cuda-*; do
        if [[ -f "$cand/include/cuda_runtime.h" ]]; then export CUDA_HOME="$cand"; break; fi
    done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}" >>"$SETUP_LOG"

# 1. install (builds fastres._C where a toolkit is found)
run_step install "${FASTRES_CHECK_INSTALL_SECS:-240}" "$SETUP_LOG" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .

# 2. versions and backends
run_step info 60 "$SETUP_LOG" "$PY" -m fastres.cli info

# 3. every GPU test; one Triton configuration per kernel and shape (FASTRES_TRITON_AUTOTUNE=0):
# tuning every tiny test shape would spend the budget compiling (every configuration compiles in
# CI's real-target check; the benchmarks below autotune)
run_step tests "${FASTRES_CHECK_TESTS_SECS:-150}" "$OUT/gpu-tests.log" \
    env FASTRES_TRITON_AUTOTUNE=0 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider

# 4. memcheck of a small cuda-backend run, when the extension built and the tool exists
SAN_LOG="$OUT/sanitizer.log"
if ! command -v compute-sanitizer >/dev/null 2>&1; then
    STEPS+=("sanitizer|skipped (no compute-sanitizer)|0")
elif ! "$PY" -c "import fastres._C" >/dev/null 2>&1; then
    STEPS+=("sanitizer|skipped (fastres._C not built)|0")
else
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step sanitizer "${FASTRES_CHECK_SANITIZER_SECS:-90}" "$SAN_LOG" \
        compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
        "$PY" bench/sanitize_cuda.py
fi

# 5 and 6. benchmarks: the budget left, 40% to layers and 60% to models. `fastres bench` stops
# starting new measurements at --time-limit (recording the rest as skipped) and writes its JSON
# after every one, so a step killed by `timeout` still leaves what it measured. The layer step
# leaves torch.compile out by default: compiling 47 shapes × 2 modes would not fit the budget
# (the model step times compile; `fastres bench --layers` or `pytest bench/` do it per layer).
left=$(remaining)
LAYER_SECS=$(( left * 2 / 5 - 20 ))
(( LAYER_SECS < 30 )) && LAYER_SECS=30
IFS=',' read -r -a MODEL_LIST <<<"$MODELS"
MODEL_ARGS=(); for m in "${MODEL_LIST[@]}"; do MODEL_ARGS+=(--model "$m"); done
MODE_ARG=both; [[ "$MODES" == "train" ]] && MODE_ARG=train; [[ "$MODES" == "infer" ]] && MODE_ARG=infer

# shellcheck disable=SC2086
run_step layers $(( LAYER_SECS + 40 )) "$OUT/bench.log" \
    "$PY" -m fastres.cli bench --layers-only --mode "$MODE_ARG" --no-compile \
    --time-limit "$LAYER_SECS" --no-progress --strict --out "$OUT/layers" \
    ${FASTRES_CHECK_LAYER_ARGS:-}

left=$(remaining)
MODEL_SECS=$(( left - 45 ))
(( MODEL_SECS < 30 )) && MODEL_SECS=30
run_step models $(( MODEL_SECS + 40 )) "$OUT/bench.log" \
    "$PY" -m fastres.cli bench "${MODEL_ARGS[@]}" --mode "$MODE_ARG" \
    --time-limit "$MODEL_SECS" --no-progress --strict --out "$OUT/models"

# keep a copy in the repository's results folder
CARD=$("$PY" -c "from fastres.benchmark.env import environment, card_slug; print(card_slug(environment()))" 2>/dev/null || echo unknown)
DEST="$ROOT/bench/results/$(date -u +%Y-%m-%d)-$CARD"
if [[ "$CARD" == cpu ]]; then
    DEST="(not copied to bench/results: no GPU)"
else
    mkdir -p "$DEST"
    for f in setup.log gpu-tests.log sanitizer.log bench.log; do
        [[ -f "$OUT/$f" ]] && cp "$OUT/$f" "$DEST/"
    done
    [[ -f "$OUT/layers/results.json" ]] && cp "$OUT/layers/results.json" "$DEST/layers.json"
    [[ -f "$OUT/models/results.json" ]] && cp "$OUT/models/results.json" "$DEST/models.json"
    [[ -f "$OUT/models/results.png" ]] && cp "$OUT/models/results.png" "$DEST/models.png"
fi

# summary, last
{
    echo
    echo "================ fastres gpu_check summary ================"
    echo "gpu: $GPU_LINE; nvcc: $NVCC_LINE; commit: $(git rev-parse --short HEAD 2>/dev/null)"
    printf '%-10s %-32s %s\n' step status seconds
    for s in "${STEPS[@]}"; do
        IFS='|' read -r n st dt <<<"$s"
        printf '%-10s %-32s %s\n' "$n" "$st" "$dt"
    done
    echo "total: $(( $(date +%s) - START ))s of a ${BUDGET}s budget; results in $OUT and $DEST"
    for f in "$OUT/models/results.json" "$OUT/layers/results.json"; do
        [[ -f "$f" ]] && "$PY" -m fastres.benchmark.report "$f" 2>&1
    done
    if (( FAILED )); then echo "RESULT: some step failed"; else echo "RESULT: all steps passed"; fi
} | tee "$OUT/summary.txt"

exit "$FAILED"
