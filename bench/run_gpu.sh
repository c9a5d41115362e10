#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Time K-LoRA's bake and bypass modes against a direct merge on an NVIDIA GPU, one command:
#
#   COMFYUI_PATH=/path/to/ComfyUI PYTHON=/path/to/ComfyUI/venv/bin/python bash bench/run_gpu.sh
#   ... bash bench/run_gpu.sh --quick          # a one-minute smoke run
#   ... bash bench/run_gpu.sh --ranks 8,128    # other LoRA ranks (default 8,64,128)
#
# PYTHON: the interpreter of a ComfyUI install with CUDA torch (default: python3);
# COMFYUI_PATH: that ComfyUI's folder (the one holding main.py).  Nothing is
# installed or downloaded: the model (a full-size SD1.5 UNet, float16, random
# weights) and the LoRA pairs are generated on the spot.  About 10 minutes on
# one modern GPU; needs ~4 GB of GPU memory and ~8 GB of RAM.  Writes
# bench/results/<date>-modes-cuda.{json,md} and prints the table last; the
# numbers are explained in docs/modes.md (cost model).
#
# KLORA_BENCH_DEVICE=cpu runs the same script on the CPU (how the test suite
# checks it on machines without a GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python3}"
DEVICE="${KLORA_BENCH_DEVICE:-cuda}"
if [[ -z "${COMFYUI_PATH:-}" || ! -f "${COMFYUI_PATH}/comfy/model_patcher.py" ]]; then
  echo "bench/run_gpu.sh: set COMFYUI_PATH to a ComfyUI folder (with comfy/model_patcher.py); got '${COMFYUI_PATH:-}'" >&2
  exit 2
fi
export COMFYUI_PATH
if [[ "$DEVICE" == "cuda" ]]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/run_gpu.sh: " + sys.executable + " has no CUDA torch (set PYTHON)")'
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec "$PY" bench/modes.py --device "$DEVICE" "$@"
