#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# K-LoRA flips at full SDXL size (bench/flips.py), one command:
#
#   bash bench/flips.sh                    # CPU, 256 px, 3 rounds (about 1.5 h single-threaded), ~19 GB RAM
#   bash bench/flips.sh --sizes 256 512    # also 512 px
#   bash bench/flips.sh --device cuda      # the same on a GPU (needs CUDA torch in the environment, see below)
#   bash bench/flips.sh --quick            # smoke run on a tiny model (tests/test_bench_flips_smoke.py)
#
# Uses the cached test environment (scripts/setup_comfyui_env.sh).  For CUDA,
# build an environment with a CUDA torch first, e.g.
#   KLORA_ENV_DIR=~/.cache/klora-comfyui-cuda KLORA_TORCH="torch==2.14.1" bash bench/flips.sh --device cuda
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The environment's python is the setup script's last line (exec fails loudly if it printed none).
exec "$(bash scripts/setup_comfyui_env.sh | tail -n 1)" bench/flips.py "$@"
