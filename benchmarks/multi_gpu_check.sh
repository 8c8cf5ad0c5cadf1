#!/usr/bin/env bash
# Issues 6 and 7 in one call on a 4x H200 machine (device tool, nvidia-h200-x4), from the repository root:
#   source .whl/install.sh && bash benchmarks/multi_gpu_check.sh
# Stage 1, side by side (nothing timed): GPUs 2,3 run the Ray job check (benchmarks/ray_gpu_check.sh --no-fault: the
# demo config as a Ray Train job on 2 GPUs); GPUs 0,1 the context-parallel equalities at 2 GPUs (every mixer and a
# model, fp32 and bf16) and the training equality of context_parallel_size 2 against 1.
# Stage 2, all four GPUs, nothing else running: benchmarks/cp_scaling.py weak scaling at 65k tokens per GPU (model
# and kernel with the peer); the equalities at 4 GPUs; the longest phase at 1M tokens (262144 per GPU).
# Each stage is bounded; the whole ~580 s. Logs and tables go to $OUT (8 files at most).
set -u
OUT=${OUT:-/tmp/multi_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
at() { echo "$1: exit $2 at $(( $(date +%s) - start )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c

CUDA_VISIBLE_DEVICES=2,3 RAY_CHECK_S=195 OUT=/tmp/ray_logs timeout -k 5 200 bash benchmarks/ray_gpu_check.sh --no-fault \
  > "$OUT/ray.log" 2>&1 &
ray_pid=$!
CUDA_VISIBLE_DEVICES=0,1 timeout -k 5 200 python3 -m pytest -q -rA -m multigpu tests/gpu/test_context_parallel_gpu.py \
  -k "equal_one_gpu or training" > "$OUT/cp_tests_2gpu.log" 2>&1
at "cp tests, 2 GPUs" $?
wait $ray_pid
at "ray check, GPUs 2,3" $?

timeout -k 5 210 python3 benchmarks/cp_scaling.py --gpus 4 --phases model,kernel --iters 3 --timeout 100 \
  --out "$OUT/cp_scaling" > "$OUT/cp_scaling.log" 2>&1
at "cp_scaling model,kernel" $?
timeout -k 5 90 python3 -m pytest -q -rA -m multigpu tests/gpu/test_context_parallel_gpu.py -k "equal_one_gpu and 4" \
  > "$OUT/cp_tests_4gpu.log" 2>&1
at "cp tests, 4 GPUs" $?
rest=$(( 578 - ($(date +%s) - start) ))
timeout -k 5 "$rest" python3 benchmarks/cp_scaling.py --gpus 4 --phases longest --tokens-per-gpu 262144 \
  --max-tokens-per-gpu 262144 --timeout $(( rest - 10 )) --out "$OUT/cp_longest" >> "$OUT/cp_scaling.log" 2>&1
at "cp_scaling longest (1M tokens)" $?

echo "== ray"; tail -14 "$OUT/ray.log" | cut -c1-300
for f in cp_tests_2gpu cp_tests_4gpu; do echo "== $f"; grep -E "PASSED|FAILED|ERROR|passed|failed|rror" "$OUT/$f.log" | cut -c1-300 | tail -10; done
echo "== cp_scaling"; cat "$OUT/cp_scaling/table.txt" "$OUT/cp_longest/table.txt" 2>/dev/null; tail -8 "$OUT/cp_scaling.log" | cut -c1-300
