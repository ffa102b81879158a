#!/usr/bin/env bash
# One device call, one card: the PyTorch/HF peer (experiments/bench/hf_peer.py) and safejax's own
# benchmark (experiments/bench/ppo_bench.py), back to back, every result in $OUT.
#
#   bash experiments/bench/run_gpu.sh             # ON THE DEVICE, from the repo root (timeout_s=600)
#
# Budgets (seconds, hard limits enforced by the scripts themselves): hf_peer 210, ppo_bench 270; together
# < 9 minutes.  Override with PEER_BUDGET / BENCH_BUDGET; extra arguments in PEER_ARGS / BENCH_ARGS (a CPU
# smoke test of this script: PEER_ARGS=--tiny BENCH_ARGS=--tiny).  The peer needs torch and transformers
# (pip install -e ".[test]" brings both).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT="$PWD"

OUT="${OUT:-$ROOT/bench-out}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
PEER_BUDGET="${PEER_BUDGET:-210}"
BENCH_BUDGET="${BENCH_BUDGET:-270}"
LOG="$OUT/run_gpu.log"

{
  echo "run_gpu.sh: $(date -u +%FT%TZ) host=$(hostname) python=$("$PY" -V 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  echo "budgets: hf_peer ${PEER_BUDGET}s, ppo_bench ${BENCH_BUDGET}s"
} | tee "$LOG"

t0=$(date +%s)
# torch first, in its own process: it has released the card before JAX starts
# shellcheck disable=SC2086
"$PY" experiments/bench/hf_peer.py --budget "$PEER_BUDGET" --out "$OUT/hf_peer.json" ${PEER_ARGS:-} \
  > "$OUT/hf_peer.log" 2>&1
echo "hf_peer.py exit $? after $(( $(date +%s) - t0 ))s (log: hf_peer.log)" | tee -a "$LOG"

t1=$(date +%s)
# shellcheck disable=SC2086
"$PY" experiments/bench/ppo_bench.py --budget "$BENCH_BUDGET" --baseline "$OUT/hf_peer.json" \
  --out "$OUT/ppo_bench.json" ${BENCH_ARGS:-} 2>&1 | grep -v "Involuntary full rematerialization" > "$OUT/ppo_bench.log"
rc=${PIPESTATUS[0]}
echo "ppo_bench.py exit $rc after $(( $(date +%s) - t1 ))s; total $(( $(date +%s) - t0 ))s" | tee -a "$LOG"

# the two summaries last, so they land in the device call's output tail
echo "================ hf_peer.py summary"
sed -n '/^SUMMARY/,$p' "$OUT/hf_peer.log"
echo "================ ppo_bench.py summary"
sed -n '/^safejax ppo_bench/,$p' "$OUT/ppo_bench.log"
exit "$rc"
