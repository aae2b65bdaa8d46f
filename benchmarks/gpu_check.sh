#!/usr/bin/env bash
# The prepared GPU check: `bash benchmarks/gpu_check.sh [--smoke] [--out DIR] [--target DIR]`
#
# Run from a copy of the repository with .whl/ beside it (`make gpu-wheels` makes it) on a
# machine that has torch and the packages in benchmarks/gpu_packages.txt but no registry.
# It installs .whl/*.whl with `pip install --no-index --no-deps --target` into a fresh
# folder, puts that folder first on PYTHONPATH (the machine's own torch is left alone),
# checks that every installed package imports from there, then runs, each step bounded by
# `timeout` so that the whole script ends within 9 minutes (--smoke: 7, 70 s as a rule):
#   1. cuda-tests  `pytest -m cuda tests` (every test needing a GPU carries that mark)
#   2. benchmarks  `python -m benchmarks --device cuda` (explainers and metrics, then e2e)
#   3. protocol    the 600-episode miniImageNet protocol on synthetic 84 px data, every
#                  method, or as many episodes as fit (benchmarks/protocol.py says which)
#   4. torchcam    the same protocol with torchcam's deletion/insertion, for the ratio
# Every table and log goes to DIR (default benchmarks/results/): summary.md (the steps,
# their status and every table), gpu_check.log (all output), the benchmark tables and
# protocol-<device>.{md,json}; at most 8 files, so that all of them come back from a
# device machine's $OUT.
#
# --smoke: the same steps on CPU with small sizes (benchmarks --quick without bench_e2e,
# whose machinery steps 3 and 4 run; the protocol at 32 px with one query a class), from
# a fresh --target install of .whl/ too; tests/test_gpu_check.py runs it.
# PYTHON (default python3) is the interpreter. Exit status: 0 when every step passed,
# 1 when one failed or ran out of time, 2 for a usage error or a missing .whl/.
set -u
set -o pipefail

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--smoke] [--out DIR] [--target DIR]" >&2
    exit 2
}
die() {
    echo "gpu_check: error: $*" >&2
    exit 2
}

SMOKE=0
OUT=""
TARGET=""
while (($#)); do
    case "$1" in
    --smoke) SMOKE=1 ;;
    --out) (($# > 1)) || usage; OUT=$2; shift ;;
    --target) (($# > 1)) || usage; TARGET=$2; shift ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) usage ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" || die "cannot create --out $OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.md
: >"$LOG"

# Seconds for the whole script. --smoke takes about 70 s on 2 shared cores; its limits
# are wide so that a loaded CI machine does not time it out.
# 500 s, not 540: a step past its limit gets 10 s more to end before it is killed.
BUDGET=$( ((SMOKE)) && echo 420 || echo 500)
START=$SECONDS

shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
((${#WHEELS[@]})) || die "no wheels in .whl/: run 'make gpu-wheels' where PyPI is reachable and copy .whl/ along"

if [[ -n $TARGET ]]; then
    [[ ! -e $TARGET || -z $(ls -A "$TARGET") ]] || die "--target $TARGET is not empty: give a fresh folder"
    mkdir -p "$TARGET" || die "cannot create --target $TARGET"
else
    TARGET=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX") || die "mktemp failed"
    trap 'rm -rf "$TARGET"' EXIT
fi
TARGET=$(cd "$TARGET" && pwd)

STEPS=()   # "name|status|seconds"
FAILED=0
record() { # name status seconds
    STEPS+=("$1|$2|$3")
    echo "gpu_check: $1: $2 (${3} s)" | tee -a "$LOG"
}

# step NAME CAP RESERVE CMD...: run CMD for at most CAP seconds, and never into the
# RESERVE seconds kept for the steps after it; $LIMIT is the limit it got.
step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START) - reserve))
    LIMIT=$((cap < left ? cap : left))
    if ((LIMIT < 15)); then
        record "$name" "not run: out of time" 0
        FAILED=1
        return
    fi
    echo "===== $name (limit ${LIMIT} s): $*" | tee -a "$LOG"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$LIMIT" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0))
    if ((rc == 0)); then
        record "$name" ok "$took"
    elif ((rc == 124 || rc == 137)); then
        record "$name" "timed out after ${LIMIT} s" "$took"
        FAILED=1
    else
        record "$name" "failed (exit $rc)" "$took"
        FAILED=1
    fi
}

# 0. the wheels, into the fresh target, then every package imported from there
# (functions run under `timeout` through `bash -c`, so they and their variables are exported)
install_and_import() {
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$TARGET" .whl/*.whl || return 1
    "$PYTHON" - "$TARGET" <<'EOF'
import importlib, pathlib, sys

target = pathlib.Path(sys.argv[1]).resolve()
skip = {"bin", "__pycache__"}
names = sorted(
    p.stem if p.suffix == ".py" else p.name
    for p in target.iterdir()
    if not p.name.endswith((".dist-info", ".data", ".pth")) and p.name not in skip
)
wrong = []
for name in names:
    module = importlib.import_module(name)
    origin = pathlib.Path(module.__file__).resolve()
    print(f"import {name}: {origin}")
    if target not in origin.parents:
        wrong.append(f"{name} imported from {origin}, not from {target}")
import torch

print(f"torch {torch.__version__} from {torch.__file__}; CUDA available: {torch.cuda.is_available()}")
if wrong:
    sys.exit("gpu_check: error: " + "; ".join(wrong))
print(f"gpu_check: {len(names)} packages import from {target}")
EOF
}
# Every CUDA test: a GPU run where none passed is a failure, not a pass.
cuda_tests() {
    local report rc
    report=$(mktemp) || return 1
    "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider -rs tests | tee "$report"
    rc=${PIPESTATUS[0]}
    if ((!SMOKE)) && ! grep -Eq '[0-9]+ passed' "$report"; then
        echo "gpu_check: no CUDA test passed"
        rc=1
    fi
    rm -f "$report"
    return "$rc"
}
export -f install_and_import cuda_tests
export PYTHON TARGET OUT SMOKE
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

summary() {
    {
        echo "# GPU check$( ((SMOKE)) && echo ' (--smoke, CPU)')"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown);"
        echo "$("$PYTHON" -c 'import platform, torch; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.machine(); print(f"Python {platform.python_version()}, torch {torch.__version__}, device {d}")' 2>&1)"
        echo
        echo "| step | status | seconds |"
        echo "|---|---|---:|"
        for s in "${STEPS[@]}"; do
            IFS='|' read -r name status took <<<"$s"
            echo "| $name | $status | $took |"
        done
        echo
        echo "Wheels installed from .whl/ into a fresh --target: $(cd .whl && ls *.whl | tr '\n' ' ')"
        echo "Total $((SECONDS - START)) s of the ${BUDGET} s budget."
        for table in "$OUT"/*.md; do
            [[ $table == "$SUMMARY" ]] && continue
            echo
            cat "$table"
        done
    } >"$SUMMARY"
    echo "gpu_check: wrote $SUMMARY; $( ((FAILED)) && echo 'a step FAILED' || echo 'every step passed')" | tee -a "$LOG"
    exit "$FAILED"
}

PY=("$PYTHON")
if ((SMOKE)); then
    step install 60 360 bash -c install_and_import
    ((FAILED)) && summary # nothing after it can run without the packages
    step cuda-tests 90 270 bash -c cuda_tests
    step benchmarks 120 150 "${PY[@]}" -m benchmarks --device cpu --quick --out "$OUT" \
        --only bench_explainers --only bench_metrics
    record benchmarks-e2e "not run in --smoke: bench_e2e's runner is steps 3 and 4" 0
    step protocol 90 60 "${PY[@]}" -m benchmarks.protocol --device cpu --smoke --throughput \
        --budget-s 25 --out "$OUT"
    step torchcam 60 0 "${PY[@]}" -m benchmarks.protocol --device cpu --smoke \
        --deletion-insertion torchcam --episodes 3 --extrapolate-to 600 --budget-s 15 \
        --out "$OUT"
else
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        die "torch sees no CUDA device: on a CPU machine run with --smoke"
    step install 60 430 bash -c install_and_import
    ((FAILED)) && summary
    step cuda-tests 60 340 bash -c cuda_tests
    step benchmarks 90 250 "${PY[@]}" -m benchmarks --device cuda --out "$OUT" \
        --only bench_explainers --only bench_metrics
    step benchmarks-e2e 100 190 "${PY[@]}" -m benchmarks --device cuda --out "$OUT" \
        --only bench_e2e --e2e-episodes 2 --e2e-queries 15
    # The protocol gets all the time left but 100 s for torchcam's run; its budget is the
    # step's limit less the start-up (imports, CUDA) that the budget does not see.
    left=$((BUDGET - (SECONDS - START) - 100))
    step protocol "$left" 100 "${PY[@]}" -m benchmarks.protocol --device cuda --throughput \
        --budget-s $((left - 20)) --out "$OUT"
    # torchcam's run: the same episodes (shape and content), fewer of them, so that its
    # task-accuracy pass over every episode of the run stays short; the ratio compares
    # the episodes both runs reached.
    left=$((BUDGET - (SECONDS - START)))
    step torchcam "$left" 0 "${PY[@]}" -m benchmarks.protocol --device cuda \
        --deletion-insertion torchcam --episodes 20 --extrapolate-to 600 \
        --budget-s $((left - 20)) --out "$OUT"
fi
summary
