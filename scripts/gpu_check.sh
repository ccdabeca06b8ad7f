#!/usr/bin/env bash
# GPU check (`make gpu-check`): bf16 training of full and LoRA on both shipped encoders with their peak accelerator
# memory, DDP over the visible GPUs, the serving benchmark, and the ratios in docs/benchmarks_cuda.md. Under
# 10 minutes on one GPU. Without CUDA it prints why it skipped and exits 0. Options: scripts/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
