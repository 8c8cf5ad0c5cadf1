#!/usr/bin/env bash
# Training on one GPU (device tool, nvidia-h100-x1 or nvidia-h200), from the repository root:
#   source .whl/install.sh && bash benchmarks/gpu_train_check.sh [DEMO_S] [E2E_S]
# 1. the demo config end to end on the GPU in bf16 (tokenizer, data, `deepspeed --num_gpus 1 launch/train.py`),
#    within DEMO_S seconds;
# 2. the end-to-end throughput table (benchmarks/train_throughput.py): pure GDN at 16k and GDN-H1 at 65k against
#    fla's GatedDeltaNetForCausalLM at both lengths, within E2E_S seconds.
# Logs go to $OUT; a short summary is printed last.
set -u
OUT=${OUT:-/tmp/gpu_train_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEMO_S=${1:-200}
E2E_S=${2:-330}
python3 -c "import torch, triton, deepspeed; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__)" | tee "$OUT/env.log"
if [ "$DEMO_S" -gt 0 ]; then
  timeout "$DEMO_S" lctrain demo --config configs/demo.yaml --run-dir /tmp/demo_gpu > "$OUT/demo.log" 2>&1
  echo "demo exit $?" >> "$OUT/demo.log"
  cp /tmp/demo_gpu/metrics.jsonl "$OUT/demo_metrics.jsonl" 2>/dev/null
fi
if [ "$E2E_S" -gt 0 ]; then
  # Two runs: pure GDN at 16k and GDN-H1 at 65k, each against the peer at the same T; each prints rows as they land.
  half=$((E2E_S / 2))
  timeout "$half" python3 benchmarks/train_throughput.py --config gdn_1p3b --T 16384 --steps 3 --warmup 2 \
    --out "$OUT/e2e_table.txt" > "$OUT/e2e.log" 2>&1
  echo "e2e exit $?" >> "$OUT/e2e.log"
  timeout "$half" python3 benchmarks/train_throughput.py --config gdn_h1_1p3b --T 65536 --steps 3 --warmup 2 \
    --out "$OUT/e2e_table.txt" >> "$OUT/e2e.log" 2>&1
  echo "e2e exit $?" >> "$OUT/e2e.log"
fi
echo "== demo"
grep -E "step +[0-9]+/|demo finished|loss by step|exit|Error|error:" "$OUT/demo.log" 2>/dev/null | grep -v "it/s\]" | cut -c1-300 | tail -16
echo "== end-to-end"
grep -E "^measured:|ready|Error|error|exit" "$OUT/e2e.log" | cut -c1-400 | tail -20
[ -s "$OUT/e2e_table.txt" ] && cat "$OUT/e2e_table.txt"
