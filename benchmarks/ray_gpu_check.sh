#!/usr/bin/env bash
# Ray on the 2x H200 machine: the demo config as a Ray Train job on both GPUs (local head, token auth), plain and with
# a worker killed mid-run; self-checking, at most RAY_CHECK_S seconds (default 290), the cluster stopped at the end (benchmarks/ray_gpu_check.py).
#   run from the repository root, with .whl/ carried:  bash benchmarks/ray_gpu_check.sh [--no-fault]   (logs under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if ! python3 -c "import ray, deepspeed, megatron.core" 2>/dev/null; then
  source .whl/install.sh || { echo "bundle install failed"; exit 1; }
fi
echo "bundle ready after $(( $(date +%s) - start )) s"
python3 - <<'PY'
import importlib, ray
needed = ["aiohttp", "aiohttp_cors", "grpc", "opencensus", "opentelemetry.exporter.prometheus", "opentelemetry.proto",
          "prometheus_client", "pydantic"]  # what ray.dashboard.optional_deps imports: the job server's requirements
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except ImportError:
        missing.append(name)
print("ray", ray.__version__, "| job server dependencies missing:", ", ".join(missing) or "none")
PY
python3 -m ray.scripts.scripts --version >/dev/null 2>&1 || echo "the ray command line (ray.scripts.scripts) does not run here"
# The Python side stops its cluster in a finally block; this trap is the backstop if it is killed.
trap 'python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true' EXIT
left=$(( ${RAY_CHECK_S:-290} - ($(date +%s) - start) ))
timeout -k 10 "$left" python3 benchmarks/ray_gpu_check.py --out "${OUT:-/tmp/ray_gpu_check}" --budget $(( left - 15 )) "$@"
