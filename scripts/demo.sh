#!/usr/bin/env bash
# The README's first command: render with K-LoRA through a real ComfyUI
# server, without downloading any model.
#
#   bash scripts/demo.sh                      # demo models, one image
#   bash scripts/demo.sh --grid 1.0,1.5,2.0 0.3,0.5,0.7
#   bash scripts/demo.sh --comfyui ~/ComfyUI --checkpoint model.safetensors \
#       --subject dog.safetensors --style ink.safetensors --prompt "..."
#
# 1. builds (once; cached) the environment of scripts/setup_comfyui_env.sh:
#    a venv with CPU torch and ComfyUI 0.3.75 (honours KLORA_ENV_DIR and
#    COMFYUI_PATH);
# 2. runs `python -m klora_core run`: generates the seeded demo UNet, CLIP-L
#    text encoder, VAE and subject/style LoRAs into the cache (once), starts
#    ComfyUI with this pack, posts UNETLoader/CLIPLoader/CLIPTextEncode ->
#    Load Subject/Style LoRA -> K-LoRA Fuse -> KSampler -> VAEDecode ->
#    SaveImage, and saves the image, the selection map and the report.
#
# Output folder: demo-output/ (or $KLORA_DEMO_OUT, or --out DIR).  Every
# other argument goes to `python -m klora_core run` (see its --help).
# `bash scripts/demo.sh --help` shows that help at once, without building
# anything (the help needs only the standard library).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    HELP_PY="${KLORA_ENV_DIR:-$HOME/.cache/klora-comfyui}/venv/bin/python"
    [[ -x "$HELP_PY" ]] || HELP_PY="${KLORA_PYTHON:-python3}"
    echo "bash scripts/demo.sh [OPTIONS] = python -m klora_core run --out ${KLORA_DEMO_OUT:-demo-output} [OPTIONS]," \
         "in the environment of scripts/setup_comfyui_env.sh (built on first use; KLORA_ENV_DIR moves it)."
    echo
    exec "$HELP_PY" -m klora_core run --help
  fi
done

OUT_DIR="${KLORA_DEMO_OUT:-demo-output}"
VPY="$(bash scripts/setup_comfyui_env.sh | tail -n 1)"

exec "$VPY" -m klora_core run --out "$OUT_DIR" "$@"
