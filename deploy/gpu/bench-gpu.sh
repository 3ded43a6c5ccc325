#!/usr/bin/env bash
# GPU measurements sized for a lent device: one GPU, Python 3.12 with a CUDA torch and
# numpy 2 already installed, no network, at most 64 MiB carried per call, 15 minutes in all.
# It runs from a fresh copy of the repository with the machine's own python3: no venv, no
# pip from the network, no generated protobuf code (deploy/gpu/bench_gpu.py imports only
# the ranker's modules, with PYTHONPATH=services).
#
#   deploy/gpu/bench-gpu.sh                     # results under $OUT (default var/bench/gpu)
#   deploy/gpu/bench-gpu.sh --cpu-smoke         # toy sizes on the CPU: checks the script
#   deploy/gpu/bench-gpu.sh --ranker model_repository/fine_ranker/1   # a trained ranker
#
# Measures (details in bench_gpu.py and docs/benchmarks.md):
#   1. the fine ranker in torch on CUDA, fp32 against bf16 and fp16, batch 1..256 rows of the
#      served shapes, and how far the reduced precisions move the scores;
#   2. exact top-k over 1M item vectors on CUDA against the CPU FAISS flat index;
#   3. the ONNX ranker on onnxruntime's CUDA provider, only where onnxruntime-gpu is installed
#      (its wheel is ~244 MiB: it does not fit a device call), and on its CPU provider.
# Wheels found in .whl/ (e.g. faiss-cpu, 18 MiB, for the CPU FAISS baseline; numpy is
# used without it) are installed offline into a temporary directory first; name .whl in
# the call's carry. Where torch sees no GPU the script stops with status 2 and measures
# nothing. The full GPU path (Triton's onnxruntime backend on KIND_GPU, FAISS on the GPU)
# needs NGC images: docs/deploy.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT="${OUT:-var/bench/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
  site="$(mktemp -d)"
  trap 'rm -rf "$site"' EXIT
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/services${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  uname -srm
  "$PY" --version
  grep -m1 'model name' /proc/cpuinfo || true
  nproc
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  else
    echo "no nvidia-smi"
  fi
} > "$OUT/machine.txt" 2>&1

"$PY" deploy/gpu/bench_gpu.py --out "$OUT" "$@"
