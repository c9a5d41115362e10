#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# The K-LoRA benchmark, one command:
#
#   bash bench/run.sh            # full run (~10-15 min on a 2-core CPU), writes bench/results/<date>-cpu.{json,md}
#   bash bench/run.sh --quick    # CI-size smoke run (tiny model), writes bench/results/<date>-cpu-quick.{json,md}
#   bash bench/run.sh --out-dir DIR   # write the results elsewhere
#   bash bench/run.sh --modes [--quick]   # bake vs bypass vs merge, ranks 8/64/128 (bench/modes.py;
#                                         # on an NVIDIA GPU: bash bench/run_gpu.sh)
#
# Uses the cached test environment (scripts/setup_comfyui_env.sh: a venv with
# CPU torch and ComfyUI 0.3.75, built on first use).  Prints progress on
# stderr and the markdown table last on stdout.  CPU only: GPU parts print
# "skipped (no GPU)".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VPY="$(bash scripts/setup_comfyui_env.sh | tail -n 1)"
if [[ ! -x "$VPY" ]]; then
  echo "bench/run.sh: environment setup did not print a python path (got '$VPY')" >&2
  exit 1
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [[ "${1:-}" == "--modes" ]]; then
  shift
  exec "$VPY" bench/modes.py "$@"
fi
exec "$VPY" bench/bench.py "$@"
