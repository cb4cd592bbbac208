#!/usr/bin/env bash
# One device call for the fast-path issues (12, 13): build the kernels, then measure in order of importance
# until the time budget ($1 seconds for the whole script, default 470) runs out. Results under $OUT.
#   bash benchmarks/run_fast_path_gpu.sh 470        (run tool, carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
TOTAL=${1:-470}
OUTDIR=${OUT:-/tmp/fast_path_out}
mkdir -p "$OUTDIR"
left() { echo $((TOTAL - SECONDS)); }
OUT= timeout $((TOTAL - 60)) bash benchmarks/gpu_setup.sh > "$OUTDIR/setup.log" 2>&1
grep "gpu_setup\]" "$OUTDIR/setup.log" | tail -4
python3 -c "import mamba_ssm, causal_conv1d" || { echo "kernels missing after $SECONDS s"; exit 3; }
echo "[run] kernels ready at $SECONDS s"
B=$(left); [ "$B" -gt 40 ] && timeout "$B" python3 benchmarks/bench_speed.py --stacks --sections fast --repeats 3 \
  --out "$OUTDIR/fast" 2>&1 | grep "^\[fast\]\|Error\|error"
B=$(left); [ "$B" -gt 40 ] && timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_runtime.py -k fp32 \
  > "$OUTDIR/gpu_tests.log" 2>&1; tail -3 "$OUTDIR/gpu_tests.log"
B=$(left); [ "$B" -gt 60 ] && timeout "$B" python3 benchmarks/bench_speed.py --stacks --sections correctness \
  --out "$OUTDIR/correctness" 2>&1 | grep "^\[correctness\]\|Error\|error"
B=$(left); [ "$B" -gt 50 ] && timeout "$B" python3 benchmarks/check_mamba_ssm_format.py --out "$OUTDIR/mamba_ssm_format" \
  --budget-s $((B - 15)) > /dev/null 2>&1; [ -f "$OUTDIR/mamba_ssm_format.md" ] && cat "$OUTDIR/mamba_ssm_format.md"
B=$(left); [ "$B" -gt 60 ] && timeout "$B" python3 benchmarks/bench_speed.py --stacks --sections pruned --runs 5 \
  --budget-s $((B - 25)) --out "$OUTDIR/pruned" 2>&1 | grep "^\[pruned\]\|Error\|error"
echo "[run] done at $SECONDS s"
