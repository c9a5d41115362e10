#!/usr/bin/env bash
# The README's first command: show K-LoRA's per-weight, per-step choice on a
# seeded demo pair of LoRAs, without downloading any model.
#
#   bash scripts/demo.sh
#
# Writes demo-output/selection_map.png (plus the two demo LoRA files next to
# it) and prints the selection table.  Uses the cached environment of
# scripts/setup_comfyui_env.sh (honours KLORA_ENV_DIR and COMFYUI_PATH).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT_DIR="${KLORA_DEMO_OUT:-demo-output}"
VPY="$(bash scripts/setup_comfyui_env.sh | tail -n 1)"

# Step 1: the selection map of the demo LoRA pair (pure torch, no ComfyUI).
"$VPY" -m klora_core map --out "$OUT_DIR/selection_map.png" --table

echo "demo: open $OUT_DIR/selection_map.png"
