#!/usr/bin/env bash
# GPU check of calgan_fast: install with the torch found here, run the GPU tests and the head
# benchmarks, and write everything to OUTDIR. Usage:
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Needs a CUDA GPU, and Python with torch (>= 2.11, CUDA build), triton (>= 3.6), pytest,
# pytest-benchmark, ninja and pybind11 already installed: nothing is downloaded (no build
# isolation, no dependencies). Budget: 10 minutes on one H100; every stage runs under a timeout
# taken from what is left, and a stage that fails or runs out of time is reported, not fatal.
#
# OUTDIR receives:
#   info.txt           python -m calgan_fast.info (versions, GPU, backends)
#   install.log        the build of the package and its extension
#   head_quick.json/.md  forward+backward at the headline shape, every backend vs matmul (first)
#   test_*.log/.xml    pytest -m "gpu or cuda", one stage per test file
#   bench_head.json/.md  the full head benchmark (benchmarks/bench_head.py) and its report
#   bench_dstep.json/.md the discriminator step, B=24 at 256x256, against the compat module
#   summary.md         the stages, their status and time
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 570), MAX_JOBS.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-570}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

# Fail at once, before building anything, where there is no GPU to check.
if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu_check: torch is not importable with this python; set PYTHON=/path/to/python")
if torch.version.cuda is None:
    sys.exit(f"gpu_check: torch {torch.__version__} is a CPU-only build; a CUDA build is needed")
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); "
             "run this script on a machine with a GPU")
EOF
then
    exit 1
fi

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.md"
START=$SECONDS
STATUS=0
{
    echo "# calgan_fast GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo
    echo "| stage | status | seconds |"
    echo "|---|---|---|"
} > "$SUMMARY"

left() { echo $((BUDGET - (SECONDS - START))); }

# stage NAME RESERVE_S CMD...: run CMD with a timeout of the budget left minus RESERVE_S (at most
# STAGE_CAP seconds where that is set), and append its row to the summary as soon as it ends.
stage() {
    local name=$1 reserve=$2
    shift 2
    local t0=$SECONDS limit rc
    limit=$(( $(left) - reserve ))
    if [[ -n ${STAGE_CAP:-} ]] && (( limit > STAGE_CAP )); then limit=$STAGE_CAP; fi
    if (( limit < 10 )); then
        echo "| $name | skipped: out of time | 0 |" >> "$SUMMARY"
        echo "gpu_check: $name skipped (out of time)" >&2
        STATUS=1
        return 1
    fi
    echo "gpu_check: $name (limit ${limit}s)" >&2
    timeout -s "${TIMEOUT_SIGNAL:-TERM}" --kill-after=10 "$limit" "$@"
    rc=$?
    local st="ok"
    if (( rc == 124 || rc == 137 || (rc == 2 && limit <= SECONDS - t0) )); then st="timed out after ${limit}s"; STATUS=1
    elif (( rc != 0 )); then st="failed (exit $rc)"; STATUS=1; fi
    echo "| $name | $st | $((SECONDS - t0)) |" >> "$SUMMARY"
    return $rc
}

# 1. Install with the torch found here. If the build fails, the Python backends still run from
#    the source tree (PYTHONPATH), so the rest of the check goes on.
export MAX_JOBS=${MAX_JOBS:-16}
if ! stage install 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
        > "$OUT/install.log" 2>&1; then
    # An old pip/setuptools cannot do an editable install without isolation: build in place.
    echo "gpu_check: pip install failed, see $OUT/install.log; trying setup.py build_ext --inplace" >&2
    stage build_ext 300 "$PY" setup.py build_ext --inplace >> "$OUT/install.log" 2>&1 ||
        echo "gpu_check: the extension did not build; the Python backends run from the source tree" >&2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 2. What was built, which backends run here.
stage info 290 "$PY" -m calgan_fast.info > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

# 3. The headline first: the head (M=65536, c=256, N=12, bf16, forward+backward) for every backend,
#    the reference and a plain matmul, timed in one process.
stage head_quick 280 "$PY" -m benchmarks.head_quick --json "$OUT/head_quick.json" \
    > "$OUT/head_quick.md" 2> "$OUT/head_quick.log"
cat "$OUT/head_quick.md"

# 4. GPU and CUDA tests, one stage per file: a fault (an illegal address kills the CUDA context)
#    in one file cannot take the others. SIGINT on time-out lets pytest write its report; -rA
#    lists every test's outcome in the log, and the summary gets one row per file as it ends.
#    The large-shape check (M=200k, c=512, N=16, bf16 and fp16, triton and cuda against torch)
#    is tests/test_gpu_large.py.
for f in tests/test_gpu_large.py tests/test_triton.py tests/test_cuda_backend.py \
        $(grep -l -E "mark\.(gpu|cuda)" tests/test_*.py | grep -v -E "test_(gpu_large|triton|cuda_backend)\.py"); do
    [[ -f $f ]] || continue
    name=$(basename "$f" .py)
    STAGE_CAP=150 TIMEOUT_SIGNAL=INT stage "$name" 150 "$PY" -m pytest -q -rA -m "gpu or cuda" "$f" -p no:cacheprovider \
        --junitxml="$OUT/$name.xml" > "$OUT/$name.log" 2>&1
    tail -n 3 "$OUT/$name.log"
done

# 5. The full head benchmark (docs/design.md §7 shapes) and its Markdown report.
if [[ -f benchmarks/bench_head.py ]]; then
    export CALGAN_BENCH_DEVICE=cuda
    # SIGINT on time-out: pytest then ends the session and pytest-benchmark still writes the JSON.
    TIMEOUT_SIGNAL=INT stage bench_head 60 "$PY" -m pytest -q benchmarks/bench_head.py \
        -p no:cacheprovider --benchmark-json="$OUT/bench_head.json" > "$OUT/bench_head.log" 2>&1
    tail -n 5 "$OUT/bench_head.log"
    if [[ -s "$OUT/bench_head.json" ]]; then
        stage report 0 "$PY" -m benchmarks.report "$OUT/bench_head.json" > "$OUT/bench_head.md"
    fi
else
    echo "| bench_head | missing: benchmarks/bench_head.py not in this tree | 0 |" >> "$SUMMARY"
    STATUS=1
fi

# 6. The discriminator step (docs/design.md §7, GPU: B=24 at 256x256) against the compat module.
if [[ -f benchmarks/bench_dstep.py ]]; then
    CALGAN_BENCH_DEVICE=cuda CALGAN_BENCH_ROUNDS=5 TIMEOUT_SIGNAL=INT stage bench_dstep 5 \
        "$PY" -m pytest -q benchmarks/bench_dstep.py -p no:cacheprovider \
        --benchmark-json="$OUT/bench_dstep.json" > "$OUT/bench_dstep.log" 2>&1
    tail -n 5 "$OUT/bench_dstep.log"
    if [[ -s "$OUT/bench_dstep.json" ]]; then
        "$PY" -m benchmarks.report "$OUT/bench_dstep.json" > "$OUT/bench_dstep.md" 2>/dev/null
    fi
fi

{
    echo
    echo "total: $((SECONDS - START)) s of a ${BUDGET} s budget"
} >> "$SUMMARY"
cat "$SUMMARY"
exit $STATUS
