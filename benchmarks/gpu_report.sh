#!/usr/bin/env bash
# The GPU kernel report in one command (BUILD.md, "GPU report"): ceilings, numerics and
# TFLOP/s / GB/s of every op x implementation (xla, triton, mosaic_gpu; cudnn for attention),
# written to results/gpu/gpu_report.{md,jsonl} and printed. About 7 minutes on one H200.
#
#   bash benchmarks/gpu_report.sh                 # the report
#   bash benchmarks/gpu_report.sh --dry_run       # no GPU: the plan and the lowering checks
#   bash benchmarks/gpu_report.sh --autotune      # tune first (adds up to --autotune_budget_s)
#
# Needs only jax (+ jax-cuda plugin) in $PYTHON: the kernels import from the repo root, no
# install. OUT (results/gpu), PYTHON (python) and LIMIT_S (540) override the defaults. Extra
# arguments pass on, e.g. --compile_workers=0 (compile in the main thread) or --ops=attention.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
PY=${PYTHON:-python}
LIMIT=${LIMIT_S:-540}
for a in "$@"; do  # --autotune adds up to --autotune_budget_s (300 s) before the measuring
  [ "$a" = "--autotune" ] && [ -z "${LIMIT_S:-}" ] && LIMIT=870
done
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# SIGINT first: the report writes what it has (the markdown is rewritten after every group).
timeout --signal=INT --kill-after=30 "$LIMIT" "$PY" -u -m kernels.bench gpu_report \
  --out="$OUT" "$@" 2>&1 | tee "$OUT/gpu_report.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "# gpu_report exited with $rc (124: stopped after ${LIMIT} s); what it wrote:"
  [ -f "$OUT/gpu_report.md" ] && cat "$OUT/gpu_report.md"
fi
exit "$rc"
