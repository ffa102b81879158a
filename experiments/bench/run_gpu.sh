#!/usr/bin/env bash
# One device call, one card: the PyTorch/HF + plain-JAX peer (gpu_baseline.py of ../shared/bench) and
# safejax's own benchmark (experiments/bench/ppo_bench.py), back to back, every result in $OUT.
#
#   bash experiments/bench/run_gpu.sh --prepare   # HERE, before the device call: copy gpu_baseline.py
#                                                 # into .bench/ (../shared does not travel to the device)
#   bash experiments/bench/run_gpu.sh             # ON THE DEVICE, from the repo root (timeout_s=600)
#
# Budgets (seconds, hard limits enforced by the scripts themselves): gpu_baseline 210 (+15 s grace),
# ppo_bench 270; together < 9 minutes.  Override with BASELINE_BUDGET / BENCH_BUDGET; extra arguments
# in BASELINE_ARGS / BENCH_ARGS (a CPU smoke test of this script: BASELINE_ARGS=--tiny BENCH_ARGS=--tiny).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT="$PWD"

if [[ "${1:-}" == "--prepare" ]]; then
  src="${GPU_BASELINE:-$ROOT/../shared/bench/gpu_baseline.py}"
  [[ -f "$src" ]] || { echo "run_gpu.sh: $src not found (set GPU_BASELINE=path)" >&2; exit 2; }
  mkdir -p "$ROOT/.bench"
  cp "$src" "$ROOT/.bench/gpu_baseline.py"
  echo "copied $src -> .bench/gpu_baseline.py"
  echo "keep it out of commits: echo /.bench/ >> .git/info/exclude, then pass carry=[\".bench\"] to the device call"
  exit 0
fi

OUT="${OUT:-$ROOT/bench-out}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BASELINE_BUDGET="${BASELINE_BUDGET:-210}"
BENCH_BUDGET="${BENCH_BUDGET:-270}"
LOG="$OUT/run_gpu.log"

BASE=""
for cand in "${GPU_BASELINE:-}" "$ROOT/.bench/gpu_baseline.py" "$ROOT/../shared/bench/gpu_baseline.py" \
            "$ROOT/shared/bench/gpu_baseline.py" "$ROOT/experiments/bench/gpu_baseline.py"; do
  if [[ -n "$cand" && -f "$cand" ]]; then BASE="$cand"; break; fi
done

{
  echo "run_gpu.sh: $(date -u +%FT%TZ) host=$(hostname) python=$("$PY" -V 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  echo "baseline script: ${BASE:-NOT FOUND}; budgets: baseline ${BASELINE_BUDGET}s, ppo_bench ${BENCH_BUDGET}s"
} | tee "$LOG"

t0=$(date +%s)
if [[ -n "$BASE" ]]; then
  # the JAX child gets 90 s (it needed 38 s on an H200), the torch child the rest
  # shellcheck disable=SC2086
  "$PY" "$BASE" --budget "$BASELINE_BUDGET" --jax-time 90 --out "$OUT/gpu_baseline.json" ${BASELINE_ARGS:-} \
    > /dev/null 2>&1
  echo "gpu_baseline.py exit $? after $(( $(date +%s) - t0 ))s (log: gpu_baseline.log)" | tee -a "$LOG"
else
  echo "gpu_baseline.py not found: run 'bash experiments/bench/run_gpu.sh --prepare' here first" | tee -a "$LOG"
fi

t1=$(date +%s)
# shellcheck disable=SC2086
"$PY" experiments/bench/ppo_bench.py --budget "$BENCH_BUDGET" --baseline "$OUT/gpu_baseline.json" \
  --out "$OUT/ppo_bench.json" ${BENCH_ARGS:-} 2>&1 | grep -v "Involuntary full rematerialization" > "$OUT/ppo_bench.log"
rc=${PIPESTATUS[0]}
echo "ppo_bench.py exit $rc after $(( $(date +%s) - t1 ))s; total $(( $(date +%s) - t0 ))s" | tee -a "$LOG"

# the two summaries last, so they land in the device call's output tail
if [[ -f "$OUT/gpu_baseline.log" ]]; then
  echo "================ gpu_baseline.py summary"
  sed -n '/^SUMMARY/,$p' "$OUT/gpu_baseline.log"
fi
echo "================ ppo_bench.py summary"
sed -n '/^safejax ppo_bench/,$p' "$OUT/ppo_bench.log"
exit "$rc"
