#!/usr/bin/env bash
# Gated DeltaNet on one GPU session (device tool, nvidia-h100-x1), from the repository root:
#   source .whl/install.sh && bash benchmarks/gdn_gpu_check.sh [TEST_S] [PROFILE_S] [TABLE_S]
# 1. tests/gpu/test_gated_delta_gpu.py (bf16 vs float64, up to 16k, varlen) within TEST_S seconds;
# 2. python -m kernel_ops.gdn (lctrain times at 8k-131k, segment sweep, per-kernel table, fla cross-check and
#    time) within PROFILE_S seconds;
# 3. if TABLE_S > 0, the benchmark table (benchmarks/kernels.py --op gdn) within TABLE_S seconds.
# Logs go to $OUT; a short summary is printed last.
set -u
OUT=${OUT:-/tmp/gdn_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TEST_S=${1:-110}
PROFILE_S=${2:-140}
TABLE_S=${3:-0}
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" \
  | tee "$OUT/env.log"
if [ "$TEST_S" -gt 0 ]; then
  timeout "$TEST_S" python3 -m pytest -q -rA -s -p no:cacheprovider tests/gpu/test_gated_delta_gpu.py > "$OUT/tests.log" 2>&1
  echo "tests exit $?" >> "$OUT/tests.log"
fi
if [ "$PROFILE_S" -gt 0 ]; then
  (cd benchmarks && timeout "$PROFILE_S" python3 -m kernel_ops.gdn) > "$OUT/profile.log" 2>&1
  echo "profile exit $?" >> "$OUT/profile.log"
fi
if [ "$TABLE_S" -gt 0 ]; then
  timeout "$TABLE_S" python3 benchmarks/kernels.py --op gdn > "$OUT/table.log" 2>&1
  echo "table exit $?" >> "$OUT/table.log"
fi
echo "== tests"
grep -E "^\{|passed|failed|error|Error|exit" "$OUT/tests.log" 2>/dev/null | cut -c1-400 | tail -30
echo "== profile"
grep -vE "^\s*$" "$OUT/profile.log" 2>/dev/null | cut -c1-160 | tail -45
if [ "$TABLE_S" -gt 0 ]; then
  echo "== table"
  if grep -q "^== gdn" "$OUT/table.log"; then sed -n '/^== gdn/,$p' "$OUT/table.log"; else grep -E "measured|exit|Error" "$OUT/table.log"; fi
fi
