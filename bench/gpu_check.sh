#!/usr/bin/env bash
# One command for a GPU machine: install, GPU tests, model, block and layer benchmarks, memcheck.
#
#   OUT=/some/folder bash bench/gpu_check.sh
#
# Made for a machine with torch >= 2.11, triton >= 3.6, nvcc and no package registry. Every step
# runs under `timeout`, against one overall budget (FASTRES_CHECK_BUDGET seconds, default 470, so
# the whole check ends inside 8 minutes); a failed step does not stop the next, but the script
# exits non-zero if any step failed. Results go to $OUT (default /tmp/fastres-gpu-check), copied
# to bench/results/<date>-<card>/. A short summary is printed last.
#
# Order: what a short GPU session must not lose comes first. Correctness (the GPU tests, in
# parallel shards with a cap each), then fastres and eager img/s of ResNet-50 and ResNeXt-50
# (`fastres bench` measures fastres and eager of every model before any torch.compile and stops a
# measurement midway at its --time-limit, writing its JSON after each), then a training step of
# single ResNet-50 / ResNeXt-50 blocks (the block op vs the same block layer by layer vs eager),
# then the per-layer times, then memcheck of the CUDA C++ kernels.
#
# Knobs (environment):
#   FASTRES_CHECK_BUDGET        overall seconds (default 470)
#   FASTRES_CHECK_MODELS        model-level models, comma list (default: resnet50 and
#                               resnext50_32x4d: their first steps compile ~75 Triton variants
#                               cold; add wide_resnet50_2,resnet18,preact_resnet50 when warm)
#   FASTRES_CHECK_MODES         train,infer (default both)
#   FASTRES_CHECK_MODEL_AUTOTUNE, FASTRES_CHECK_LAYER_AUTOTUNE
#                               1: that step autotunes Triton configurations (default 0: the first
#                               fitting configuration per kernel, one compile each; tuning results
#                               are kept in Triton's disk cache for the next run)
#   FASTRES_CHECK_LAYER_ARGS    extra `fastres bench` arguments for the layer step
#   FASTRES_CHECK_BLOCK_ARGS    extra `fastres bench` arguments for the block step (default
#                               batch 128, the first stage's two blocks of each model)
#   FASTRES_CHECK_SKIP          steps to skip, comma list: install,info,tests-triton,tests-cuda,
#                               models,blocks,layers,sanitizer
#   FASTRES_CHECK_DRY_RUN=1     rehearse on a machine without a GPU (CI does): pip --dry-run,
#                               the GPU test shards collect and skip, tiny CPU benchmarks, the
#                               sanitizer script's CPU dry run; nothing copied to bench/results
#   FASTRES_COMMIT              the commit under test, where the tree is a copy without .git
#                               (recorded in every result)
#   PYTHON                      interpreter (default python3)

set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/fastres-gpu-check}"
mkdir -p "$OUT"
BUDGET="${FASTRES_CHECK_BUDGET:-470}"
DRY="${FASTRES_CHECK_DRY_RUN:-0}"
MODELS="${FASTRES_CHECK_MODELS:-resnet50,resnext50_32x4d}"
MODES="${FASTRES_CHECK_MODES:-train,infer}"
SKIP=",${FASTRES_CHECK_SKIP:-},"
START=$(date +%s)
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
MODEL_EXTRA=()
LAYER_EXTRA=()
BLOCK_EXTRA=(--batch 128 --block-limit 2)
if [[ "$DRY" == 1 ]]; then
    MODELS="${FASTRES_CHECK_MODELS:-resnet18}"
    MODEL_EXTRA=(--no-compile)       # a CPU torch.compile of a training step takes minutes
    LAYER_EXTRA=(--layer-limit 1)
    BLOCK_EXTRA=(--block-limit 1)    # tiny CPU: one model's first block
fi

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

# cap_of MAX: the cap a step may use, leaving RESERVE seconds for the steps after it
cap_of() {
    local max="$1" reserve="$2" left; left=$(( $(remaining) - reserve ))
    (( left < 30 )) && left=30
    echo $(( max < left ? max : left ))
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
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${FASTRES_COMMIT:-unknown}")"
    echo "gpu: $GPU_LINE"
    echo "nvcc: $NVCC_LINE"
    echo "dry run: $DRY"
} >"$SETUP_LOG"

# CUDA_HOME: the toolkit root holding include/cuda_runtime.h (nvcc on PATH may be a wrapper)
if [[ -z "${CUDA_HOME:-}" ]]; then
    for cand in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")")" \
                /usr/local/cuda /usr/local/cuda-*; do
        if [[ -f "$cand/include/cuda_runtime.h" ]]; then export CUDA_HOME="$cand"; break; fi
    done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}" >>"$SETUP_LOG"

# 1. install, building fastres._C where a toolkit is found. Budget: 5 translation units built in
# parallel; ops.cpp (the torch binding) alone takes ~60-100 s whatever MAX_JOBS is: cap 200 s.
PIP_DRY=(); [[ "$DRY" == 1 ]] && PIP_DRY=(--dry-run)
run_step install 200 "$SETUP_LOG" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index "${PIP_DRY[@]}" -e .

# 2. versions and backends (seconds).
run_step info 30 "$SETUP_LOG" "$PY" -m fastres.cli info

# 3 and 4. every GPU test, one Triton configuration per kernel and shape (FASTRES_TRITON_AUTOTUNE=0;
# the all-configs test forces each configuration once). Budget: ~700 distinct Triton
# compilations (forward and BN ~450, see bench/run_gpu_tests.py; the training cases also compile
# the dgrad/wgrad kernels), ~15 CPU-minutes, in 12 shards on 16 cores: ~75-100 s of compiling
# per shard plus collection (~15 s) and the float64 references: cap 170 s. The cuda group
# compiles nothing (the extension is built): cap 40 s.
TESTS_LOG="$OUT/gpu-tests.log"
cap=$(cap_of 170 220)
run_step tests-triton $(( cap + 25 )) "$TESTS_LOG" \
    env FASTRES_TRITON_AUTOTUNE=0 "$PY" bench/run_gpu_tests.py triton --timeout "$cap" \
    --logs "$OUT/gpu-tests"
cap=$(cap_of 40 190)
run_step tests-cuda $(( cap + 25 )) "$TESTS_LOG" \
    env FASTRES_TRITON_AUTOTUNE=0 "$PY" bench/run_gpu_tests.py cuda --timeout "$cap" \
    --logs "$OUT/gpu-tests"

# What is left after the tests goes to the benchmarks, less a fixed reserve for memcheck.
SAN_RESERVE=75

# 5. model level: 45% of what is left (after the memcheck reserve). fastres and eager of every
# model first (a ResNet-50 training step at batch 256 is ~0.1-0.3 s; with warm-up and 10 repeats
# ~5 s per system, plus the first step's compilations: ~15 conv kernel variants per model with
# one configuration each), torch.compile last (about a minute per cold training-step compile);
# `--time-limit` stops within a measurement.
IFS=',' read -r -a MODEL_LIST <<<"$MODELS"
MODEL_ARGS=(); for m in "${MODEL_LIST[@]}"; do MODEL_ARGS+=(--model "$m"); done
MODE_ARG=both; [[ "$MODES" == "train" ]] && MODE_ARG=train; [[ "$MODES" == "infer" ]] && MODE_ARG=infer
MODEL_SECS=$(( ( $(remaining) - SAN_RESERVE ) * 45 / 100 )); (( MODEL_SECS < 30 )) && MODEL_SECS=30
run_step models $(( MODEL_SECS + 30 )) "$OUT/bench.log" \
    env FASTRES_TRITON_AUTOTUNE="${FASTRES_CHECK_MODEL_AUTOTUNE:-0}" \
    "$PY" -m fastres.cli bench "${MODEL_ARGS[@]}" --mode "$MODE_ARG" "${MODEL_EXTRA[@]}" \
    --levels model --time-limit "$MODEL_SECS" --no-progress --strict --out "$OUT/models"

# 6. block level (issue 10): half of what is left after the memcheck reserve, 30-100 s. A
# training step (forward + backward, no optimizer) of ResNet-50's layer1.0 (projection) and
# layer1.1 (identity), then ResNeXt-50's, at batch 128, bf16: the fastres block op (triton), the
# same block layer by layer (fastres.nn.layer_by_layer: conv_bn_relu per conv) and torchvision's
# block in eager. A step is ~1-5 ms, so 3 warm-up + 10 timed steps per system are well under a
# second; what costs is the first step's Triton compilations (first-fitting configurations:
# ~15-25 kernel variants per new block structure, ~1-2 s each cold; the model step has compiled
# many of them into Triton's disk cache) and cuDNN's algorithm search for eager: ~10 s to start
# the process and read the ceilings, ~20-40 s for ResNet-50's two blocks cold, ~10-30 s more
# for ResNeXt-50's grouped ones. --time-limit keeps what finished.
BLOCK_SECS=$(( ( $(remaining) - SAN_RESERVE ) * 50 / 100 ))
(( BLOCK_SECS > 100 )) && BLOCK_SECS=100; (( BLOCK_SECS < 30 )) && BLOCK_SECS=30
# shellcheck disable=SC2086
# 40 s of slack: --time-limit cannot stop a cold backward (it runs on autograd's device thread)
run_step blocks $(( BLOCK_SECS + 40 )) "$OUT/bench.log" \
    env FASTRES_TRITON_AUTOTUNE="${FASTRES_CHECK_MODEL_AUTOTUNE:-0}" \
    "$PY" -m fastres.cli bench --levels block --quick --mode train --model resnet50 \
    --model resnext50_32x4d "${BLOCK_EXTRA[@]}" --time-limit "$BLOCK_SECS" --no-progress \
    --strict --out "$OUT/blocks" ${FASTRES_CHECK_BLOCK_ARGS:-}

# 7. layer level: what is left but the memcheck reserve and 30 s of slack. Every distinct conv
# of ResNet-50 and ResNeXt-50, the triton and cuda backends against eager and cuDNN's conv
# alone; first-fitting Triton configurations by default (autotuning each new shape compiles
# ~9 conv and ~13 BN configurations, 30-60 s before its first number:
# FASTRES_CHECK_LAYER_AUTOTUNE=1 when the budget allows); torch.compile per layer would not fit
# (`fastres bench --layers` or `pytest bench/` time it). The least valuable benchmark step: when
# less than 35 s is left before the memcheck reserve (the block step took it), it is skipped
# rather than squeezing memcheck.
LAYER_SECS=$(( $(remaining) - SAN_RESERVE - 30 )); (( LAYER_SECS < 20 )) && LAYER_SECS=20
if (( $(remaining) - SAN_RESERVE < 35 )) && [[ "$SKIP" != *",layers,"* ]]; then
    STEPS+=("layers|skipped (budget: memcheck next)|0")
else
    # shellcheck disable=SC2086
    run_step layers $(( LAYER_SECS + 25 )) "$OUT/bench.log" \
        env FASTRES_TRITON_AUTOTUNE="${FASTRES_CHECK_LAYER_AUTOTUNE:-0}" \
        "$PY" -m fastres.cli bench --layers-only --mode "$MODE_ARG" --no-compile \
        "${LAYER_EXTRA[@]}" --time-limit "$LAYER_SECS" --no-progress --strict \
        --out "$OUT/layers" ${FASTRES_CHECK_LAYER_ARGS:-}
fi

# 8. memcheck of a small cuda-backend run (SAN_RESERVE): expected outputs by the reference
# backend first (no sanitizer), then only the cuda backend's kernels under compute-sanitizer.
SAN_LOG="$OUT/sanitizer.log"
if [[ "$DRY" == 1 ]]; then
    run_step sanitizer 60 "$SAN_LOG" "$PY" bench/sanitize_cuda.py --dry-run "$OUT/expected.pt"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
    STEPS+=("sanitizer|skipped (no compute-sanitizer)|0")
elif ! "$PY" -c "import fastres._C" >/dev/null 2>&1; then
    STEPS+=("sanitizer|skipped (fastres._C not built)|0"); FAILED=1
else
    run_step sanitizer-expect 25 "$SAN_LOG" "$PY" bench/sanitize_cuda.py --expect "$OUT/expected.pt"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step sanitizer 45 "$SAN_LOG" \
        compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
        "$PY" bench/sanitize_cuda.py --check "$OUT/expected.pt"
fi

# keep a copy in the repository's results folder
CARD=$("$PY" -c "from fastres.benchmark.env import environment, card_slug; print(card_slug(environment()))" 2>/dev/null || echo unknown)
DEST="$ROOT/bench/results/$(date -u +%Y-%m-%d)-$CARD"
if [[ "$CARD" == cpu || "$DRY" == 1 ]]; then
    DEST="(not copied to bench/results: no GPU)"
else
    mkdir -p "$DEST"
    for f in setup.log gpu-tests.log sanitizer.log bench.log; do
        [[ -f "$OUT/$f" ]] && cp "$OUT/$f" "$DEST/"
    done
    [[ -d "$OUT/gpu-tests" ]] && cp -r "$OUT/gpu-tests" "$DEST/"
    [[ -f "$OUT/layers/results.json" ]] && cp "$OUT/layers/results.json" "$DEST/layers.json"
    [[ -f "$OUT/models/results.json" ]] && cp "$OUT/models/results.json" "$DEST/models.json"
    [[ -f "$OUT/blocks/results.json" ]] && cp "$OUT/blocks/results.json" "$DEST/blocks.json"
    [[ -f "$OUT/models/results.png" ]] && cp "$OUT/models/results.png" "$DEST/models.png"
fi

# summary, last
{
    echo
    echo "================ fastres gpu_check summary ================"
    echo "gpu: $GPU_LINE; nvcc: $NVCC_LINE; commit: $(git rev-parse --short HEAD 2>/dev/null || echo "${FASTRES_COMMIT:-unknown}")"
    printf '%-16s %-32s %s\n' step status seconds
    for s in "${STEPS[@]}"; do
        IFS='|' read -r n st dt <<<"$s"
        printf '%-16s %-32s %s\n' "$n" "$st" "$dt"
    done
    if [[ -f "$OUT/blocks/results.json" ]]; then
        HEAD=$("$PY" -m fastres.benchmark.report --block-headline "$OUT/blocks/results.json" 2>&1)
        echo "${HEAD:-block step: no block has both a fastres and an eager time}"
    fi
    echo "total: $(( $(date +%s) - START ))s of a ${BUDGET}s budget; results in $OUT and $DEST"
    [[ -f "$TESTS_LOG" ]] && grep -E '^(triton|cuda): |^  (FAILED|ERROR) ' "$TESTS_LOG" | head -n 40
    for f in "$OUT/models/results.json" "$OUT/blocks/results.json" "$OUT/layers/results.json"; do
        [[ -f "$f" ]] && "$PY" -m fastres.benchmark.report "$f" 2>&1
    done
    if (( FAILED )); then echo "RESULT: some step failed"; else echo "RESULT: all steps passed"; fi
} | tee "$OUT/summary.txt"
[[ -d "$DEST" ]] && cp "$OUT/summary.txt" "$DEST/"

exit "$FAILED"
