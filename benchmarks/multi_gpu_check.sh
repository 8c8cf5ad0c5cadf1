#!/usr/bin/env bash
# Issues 6 and 7 on a 4x H200 machine (device tool, nvidia-h200-x4), from the repository root, one stage per call
# (each fits the 600 s limit; logs and tables go to $OUT, at most 8 files):
#   source .whl/install.sh && bash benchmarks/multi_gpu_check.sh STAGE
#   equalities  context-parallel equalities (every mixer and a model, fp32 and bf16) at 2 GPUs (0,1) beside the Ray
#               job check on GPUs 2,3 (benchmarks/ray_gpu_check.sh --no-fault), then at 4 GPUs; the training
#               equality of context_parallel_size 2 against 1
#   scaling     benchmarks/cp_scaling.py: weak scaling of the ~1.3B GDN-H1 at 65k tokens per GPU, then the gated
#               delta rule alone against the peer's CP
#   longest     the longest sequence from 1M tokens (262144 per GPU), doubling
# Seen on 4x H200 (NOTES.md): the 1.3B model's build and compile on 4 ranks takes over 100 s per launch; 1M tokens
# trained one step in 61 s.
set -u
OUT=${OUT:-/tmp/multi_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
at() { echo "$1: exit $2 at $(( $(date +%s) - start )) s"; }
cp_tests() {  # $1 GPUs, $2 pytest -k expression, $3 seconds, $4 log name
  CUDA_VISIBLE_DEVICES=$1 timeout -k 5 "$3" python3 -m pytest -q -rA -m multigpu \
    tests/gpu/test_context_parallel_gpu.py -k "$2" > "$OUT/$4.log" 2>&1
  at "$4" $?
  grep -E "PASSED|FAILED|ERROR|passed|failed|rror" "$OUT/$4.log" | cut -c1-300 | tail -12
}
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c
case "${1:-}" in
  equalities)
    if [ "$(nvidia-smi -L | wc -l)" -lt 4 ]; then  # a 2-GPU machine: the 2-GPU equalities and the training one
      cp_tests 0,1 "equal_one_gpu" 250 cp_equal_2gpu
      cp_tests 0,1 "training" 200 cp_training
      exit 0
    fi
    CUDA_VISIBLE_DEVICES=2,3 RAY_CHECK_S=240 OUT=/tmp/ray_logs timeout -k 5 245 bash benchmarks/ray_gpu_check.sh \
      --no-fault > "$OUT/ray.log" 2>&1 &
    ray_pid=$!
    cp_tests 0,1 "equal_one_gpu" 250 cp_equal_2gpu
    wait $ray_pid; at "ray check, GPUs 2,3" $?; tail -8 "$OUT/ray.log" | cut -c1-300
    cp_tests 0,1,2,3 "equal_one_gpu and 4" 150 cp_equal_4gpu
    cp_tests 0,1 "training" 170 cp_training ;;
  scaling)
    timeout -k 5 585 python3 benchmarks/cp_scaling.py --phases model,kernel --iters 3 --timeout 285 \
      --out "$OUT/cp_scaling" --logs "$OUT/cp_scaling/launches" > "$OUT/cp_scaling.log" 2>&1
    at "cp_scaling model,kernel" $?
    cat "$OUT/cp_scaling/table.txt" 2>/dev/null || tail -20 "$OUT/cp_scaling.log" | cut -c1-300 ;;
  longest)
    timeout -k 5 585 python3 benchmarks/cp_scaling.py --phases longest --tokens-per-gpu 262144 \
      --max-tokens-per-gpu 1048576 --timeout 280 --out "$OUT/cp_longest" --logs "$OUT/cp_longest/launches" \
      > "$OUT/cp_longest.log" 2>&1
    at "cp_scaling longest" $?
    cat "$OUT/cp_longest/table.txt" 2>/dev/null || tail -20 "$OUT/cp_longest.log" | cut -c1-300 ;;
  *) echo "usage: bash benchmarks/multi_gpu_check.sh equalities|scaling|longest" >&2; exit 2 ;;
esac
