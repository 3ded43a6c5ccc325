#!/usr/bin/env bash
# The serving benchmarks of docs/benchmarks.md on a machine with an NVIDIA GPU:
# FAISS recall on the GPU (SLUICE_RECALL_USE_GPU=1) and Triton with the CUDA config
# (model_repository/fine_ranker/configs/gpu.pbtxt, i.e. `sluice up --gpu` / Cluster(triton_gpu=True)).
#
#   deploy/gpu/bench-gpu.sh [ARTIFACTS]        # default: var/bench100k (built if missing)
#
# Needs: nvidia-smi, a CUDA build of torch and faiss-gpu in .venv (the CPU wheels in
# pyproject.toml do not see the GPU; the script stops early and says so). Writes everything
# under var/bench/gpu/ and the figures under docs/figures/gpu-*. Not run in the CPU-only
# development environment: this script has only been checked with `bash -n` and its CPU paths.
set -euo pipefail
cd "$(dirname "$0")/../.."

ARTIFACTS="${1:-var/bench100k}"
OUT="${OUT:-var/bench/gpu}"
FIG="${FIG:-docs/figures}"
PY=.venv/bin/python
SLUICE=.venv/bin/sluice
export SLUICE_RECALL_USE_GPU=1
export HF_HUB_OFFLINE=1

log() { printf '\n== %s (load %s)\n' "$*" "$(cut -d' ' -f1-3 /proc/loadavg)"; }

command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this script needs an NVIDIA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY - <<'EOF'
import sys
import faiss, torch
ok = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
print(f"torch {torch.__version__} cuda={torch.cuda.is_available()}; faiss {faiss.__version__} gpus={faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}")
if not ok:
    sys.exit("install a CUDA torch and faiss-gpu into .venv first (pip install faiss-gpu-cu12 …)")
EOF
mkdir -p "$OUT" "$FIG"
{ lscpu | grep -E 'Model name|^CPU\(s\)'; nvidia-smi -L; } > "$OUT/machine.txt"

if [ ! -f "$ARTIFACTS/manifest.json" ]; then
  log "build a 100k-item catalog into $ARTIFACTS"
  $SLUICE build --items 100000 --users 20000 --out "$ARTIFACTS" \
    --model-repository "$ARTIFACTS/model_repository"
fi

# At >= 50k items `sluice build` picks ivf_pq_refine, whose refine stage has no FAISS GPU
# version: AnnIndex.load(use_gpu=True) then raises and recall would not start. Check first and
# fall back to "auto" (GPU where possible, CPU with a warning otherwise), saying so.
if ! $PY - "$ARTIFACTS" <<'EOF'
import sys
from pathlib import Path
from sluice.recall.ann_index import AnnIndex
for name in ("behaviour.faiss", "text.faiss"):
    try:
        AnnIndex.load(Path(sys.argv[1]) / name, use_gpu=True)
        print(f"{name}: on GPU")
    except RuntimeError as exc:
        print(f"{name}: {exc}")
        sys.exit(1)
EOF
then
  echo "!! a recall index of $ARTIFACTS has no GPU version: running recall with" \
       "SLUICE_RECALL_USE_GPU unset (auto); report recall as CPU FAISS" | tee -a "$OUT/machine.txt"
  unset SLUICE_RECALL_USE_GPU
fi

log "load: open-loop Poisson, step to saturation (GPU Triton + GPU FAISS)"
$SLUICE bench load --start --gpu --artifacts "$ARTIFACTS" --start-rate 50 --step 50 \
  --max-rate 2000 --duration 20 --clients 4 --out "$OUT/load" --figures "$FIG" --tag gpu-load

log "load at the 50 req/s target"
$SLUICE bench load --start --gpu --artifacts "$ARTIFACTS" --rates 50 --duration 60 \
  --out "$OUT/load50" --figures "$FIG" --tag gpu-load50

log "load, one-machine layout (the gateway runs the stages; Triton on the GPU)"
$SLUICE bench load --start --gpu --stages local --artifacts "$ARTIFACTS" --start-rate 50 \
  --step 50 --max-rate 2000 --duration 20 --clients 4 --out "$OUT/load-local" \
  --figures "$FIG" --tag gpu-load-local

log "gRPC cascade vs in process (the in-process ranker stays on CPU torch unless torch sees CUDA)"
$SLUICE bench compare grpc --gpu --artifacts "$ARTIFACTS" --requests 500 \
  --out "$OUT/compare" --figures "$FIG"

log "dynamic batching vs none on the GPU Triton config"
$SLUICE bench compare batching --gpu --artifacts "$ARTIFACTS" \
  --rates 100,200,400,800,1200,1600,2400,3200,4800 --clients 4 --p99-ms 20 \
  --out "$OUT/compare" --figures "$FIG"

log "perf_analyzer vs the project's client"
$SLUICE bench compare perf-analyzer --gpu --artifacts "$ARTIFACTS" \
  --concurrency 1,4,16,64 --clients 4 --out "$OUT/compare"

log "FLOP/s: CUDA matmul peak vs the served ranker"
$SLUICE bench flops --gpu --device cuda --artifacts "$ARTIFACTS" --concurrency 128 --clients 4 \
  --out "$OUT/flops" --figures "$FIG"

log "scaling vs candidate budgets"
$SLUICE bench scale --gpu --artifacts "$ARTIFACTS" --skip-catalog --rate 100 \
  --out "$OUT/scale" --figures "$FIG"

log "done: results under $OUT, figures $FIG/gpu-* and friends"
