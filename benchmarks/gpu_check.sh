#!/usr/bin/env bash
# The GPU check: one script for a machine with one NVIDIA GPU and no network.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine; under 8 minutes on one H100
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on this CPU: tiny preset, Triton
#                                                # interpreter, no pip install; ~1-3 minutes
#
# Steps (each timed, each with a time limit inside an overall budget; a failing
# step is recorded and the script goes on):
#   environment   versions, GPU name
#   build         python3 -m pip install --no-build-isolation --no-deps -e .   (dry run: PYTHONPATH)
#   tests         python3 -m pytest -q -x with compiled Triton kernels (dry run: TRITON_INTERPRET=1
#                 and a subset, $BYE_GPU_CHECK_PYTEST_ARGS)
#   quantized     benchmarks/check_quantized.py: a LLaVA-shaped random model (bench_score's cpu-1b preset,
#                 bf16) saved and reloaded plain, 8-bit and 4-bit (bitsandbytes) and with device_map="auto"
#                 + max_memory offloading half the weights to CPU; score vs score_reference, time, peak
#                 memory. Missing bitsandbytes/accelerate is recorded as such (dry run: tiny fp32 model,
#                 offload to disk; 8/4-bit recorded as "skipped: needs CUDA")
#   bench_score   benchmarks/bench_score.py, LLaVA-1.5-7B architecture in bf16 with random weights at
#                 576, 2916 and 5184 image tokens: forward and score at batch 1 and 4, the reference
#                 path at batch 1, 2, 4, 8 until it runs out of memory (dry run: --quick)
#   bench_kernel  benchmarks/bench_kernel.py, if present
# then prints a short table last and where the results went.
#
# Results: $OUT if set, else benchmarks/results/: gpu_check_steps.tsv, gpu_check_summary.md,
# bench_score_gpu_check*.{csv,md}, check_quantized_gpu_check*.{csv,md}, bench_kernel_*.{csv,md},
# gpu_check_logs/<step>.log.
# Environment: PYTHON (default python3), BYE_GPU_CHECK_BUDGET (seconds, default 465; dry run 170).
# Exit status: 0 if every step passed, 1 otherwise (after the table).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
DRY=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY=1 ;;
        -h | --help) sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

DEST="${OUT:-$REPO/benchmarks/results}"
LOGS="$DEST/gpu_check_logs"
mkdir -p "$LOGS"
STEPS="$DEST/gpu_check_steps.tsv"
printf 'step\tstatus\tseconds\n' >"$STEPS"
if ((DRY)); then
    BUDGET="${BYE_GPU_CHECK_BUDGET:-170}"
    TAG=gpu_check_dryrun
    export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    BUDGET="${BYE_GPU_CHECK_BUDGET:-465}"
    TAG=gpu_check
    unset TRITON_INTERPRET # compiled kernels
fi
DEADLINE=$((SECONDS + BUDGET))
FAILED=0

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit (shrunk to what the budget has left),
# log to $LOGS/NAME.log, print its last lines, record status and seconds; never aborts the script.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((DEADLINE - SECONDS)) log="$LOGS/$name.log" t0=$SECONDS rc status
    if ((left < 15)); then
        printf '%s\t%s\t%s\n' "$name" "skipped (time budget spent)" 0 >>"$STEPS"
        echo "== $name: skipped, time budget spent"
        FAILED=1
        return 0
    fi
    if ((limit > left)); then limit=$left; fi
    local cmd="$*"
    echo "== $name (limit ${limit}s): ${cmd%%$'\n'*}"
    set +e
    timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    set -e
    case "$rc" in
        0) status=ok ;;
        124 | 137) status="timeout (${limit}s)" ;;
        *) status="failed (rc=$rc)" ;;
    esac
    [[ "$status" == ok ]] || FAILED=1
    tail -n 4 "$log" | sed 's/^/   | /'
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$STEPS"
    echo "== $name: $status in $((SECONDS - t0))s"
}

skip() { # skip NAME WHY
    printf '%s\t%s\t0\n' "$1" "skipped ($2)" >>"$STEPS"
    echo "== $1: skipped ($2)"
}

# ---------------------------------------------------------------- environment
step environment 60 "$PY" -c '
import sys
sys.path.insert(0, "benchmarks")
from _machine import describe
import bye_fast
print(describe())
print("bye_fast from", bye_fast.__file__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
'
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOGS/environment.log" 2>&1 || true
fi

# ---------------------------------------------------------------- build
if ((DRY)); then
    skip build "dry run: PYTHONPATH=$REPO"
else
    step build 150 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

# ---------------------------------------------------------------- tests
if ((DRY)); then
    read -r -a PYTEST_ARGS <<<"${BYE_GPU_CHECK_PYTEST_ARGS:-tests/test_scores.py tests/test_score.py}"
    step tests 120 "$PY" -m pytest -q -x -p no:cacheprovider "${PYTEST_ARGS[@]}"
else
    read -r -a PYTEST_ARGS <<<"${BYE_GPU_CHECK_PYTEST_ARGS:-}"
    step tests 150 "$PY" -m pytest -q -x -p no:cacheprovider ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"}
fi

# ---------------------------------------------------------------- quantized
if ((DRY)); then
    step quantized 60 "$PY" benchmarks/check_quantized.py --cpu --threads 1 --tag "$TAG" --out "$DEST"
else
    step quantized 90 "$PY" benchmarks/check_quantized.py --tag "$TAG" --out "$DEST"
fi

# ---------------------------------------------------------------- bench_score
if ((DRY)); then
    step bench_score 120 "$PY" benchmarks/bench_score.py --quick --grouped --threads 1 --timeout 60 \
        --tag "$TAG" --out "$DEST"
else
    step bench_score 270 "$PY" benchmarks/bench_score.py --preset llava-1.5-7b --device cuda --dtype bfloat16 \
        --image-tokens 576 2916 5184 --batches 1 4 --ref-batches 1 2 4 8 --repeats 2 --grouped \
        --timeout 110 --tag "$TAG" --out "$DEST"
fi

# ---------------------------------------------------------------- bench_kernel
if [[ -f benchmarks/bench_kernel.py ]]; then
    STAMP="$LOGS/.kernel_start"
    touch "$STAMP"
    step bench_kernel 60 "$PY" benchmarks/bench_kernel.py
    if [[ "$DEST" != "$REPO/benchmarks/results" ]]; then # it writes to benchmarks/results/: copy what is new
        find "$REPO/benchmarks/results" -maxdepth 1 -name 'bench_kernel_*' -newer "$STAMP" \
            -exec cp {} "$DEST"/ \; 2>/dev/null || true
    fi
    rm -f "$STAMP"
else
    skip bench_kernel "benchmarks/bench_kernel.py not present"
fi

# ---------------------------------------------------------------- table
echo
"$PY" benchmarks/gpu_check_summary.py "$STEPS" "$DEST/bench_score_$TAG.csv" "$DEST/gpu_check_summary.md" \
    "$DEST/check_quantized_$TAG.csv" ||
    cat "$STEPS"
echo
echo "gpu_check: $((SECONDS))s in all; results in $DEST (logs in $LOGS)"
exit "$FAILED"
