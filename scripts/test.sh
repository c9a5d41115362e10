#!/usr/bin/env bash
# Run the test suite in the cached test environments, once per tested ComfyUI.
#
#   bash scripts/test.sh [pytest args...]        e.g. bash scripts/test.sh -k cli -x
#       1. the whole suite on ComfyUI 0.3.75;
#       2. the tests that reach ComfyUI (marker "comfyui", see tests/conftest.py:
#          server, browser, exactness, fuse, LoRA parsing ...) on ComfyUI 0.8.0.
#   bash scripts/test.sh --comfyui 0.8.0 [args]  one leg, that version only (so does
#                                                KLORA_COMFYUI_VERSION=0.8.0)
#   COMFYUI_PATH=~/ComfyUI bash scripts/test.sh   one leg: the whole suite on that checkout
#
# Each leg builds its environment on first use (scripts/setup_comfyui_env.sh:
# a venv with CPU torch and that ComfyUI, cached in ~/.cache/klora-comfyui or
# $KLORA_ENV_DIR) and runs pytest from the repository root with that venv's
# python.  A leg whose ComfyUI source is not available here (setup exit 3)
# is skipped with a loud warning.  Exits non-zero when any leg failed;
# "no tests collected" (pytest exit 5) counts as a failure.  A -m expression
# given here narrows every leg (the second: "(EXPR) and comfyui").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FULL_VERSION="0.3.75"    # runs the whole suite
SECOND_VERSION="0.8.0"   # runs the ComfyUI-facing tests
COMFY_FACING="comfyui"

only_version="${KLORA_COMFYUI_VERSION:-}"
user_mark=""
pytest_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --comfyui) only_version="${2:?--comfyui needs a version}"; shift 2 ;;
    --comfyui=*) only_version="${1#--comfyui=}"; shift ;;
    -m) user_mark="${2:?-m needs an expression}"; shift 2 ;;
    -m*) user_mark="${1#-m}"; shift ;;
    *) pytest_args+=("$1"); shift ;;
  esac
done

if [[ -n "${COMFYUI_PATH:-}" ]]; then
  legs=("$COMFYUI_PATH")
elif [[ -n "$only_version" ]]; then
  legs=("$only_version")
else
  legs=("$FULL_VERSION" "$SECOND_VERSION")
fi

summary=()
status=0
for leg in "${legs[@]}"; do
  if [[ -n "${COMFYUI_PATH:-}" || "$leg" == "$FULL_VERSION" ]]; then
    mark="$user_mark"; what="whole suite"
  else
    mark="$COMFY_FACING"; [[ -n "$user_mark" ]] && mark="($user_mark) and $COMFY_FACING"
    what="ComfyUI-facing tests"
  fi
  if [[ -n "${COMFYUI_PATH:-}" ]]; then
    label="COMFYUI_PATH=${leg} (${what})"; leg_env=(env -u KLORA_COMFYUI_VERSION)
  else
    label="ComfyUI ${leg} (${what})"; leg_env=(env "KLORA_COMFYUI_VERSION=${leg}")
  fi
  echo "=== scripts/test.sh: ${label} ===" >&2
  start=$SECONDS

  setup_out="$("${leg_env[@]}" bash scripts/setup_comfyui_env.sh)"
  setup_rc=$?
  VPY="$(tail -n 1 <<<"$setup_out")"
  if [[ $setup_rc -eq 3 ]]; then
    summary+=("SKIPPED  ${label}: its ComfyUI source is not available here (see the WARNING above)")
    continue
  elif [[ $setup_rc -ne 0 || ! -x "$VPY" ]]; then
    summary+=("FAILED   ${label}: environment setup failed (exit ${setup_rc}, printed '${VPY}')")
    status=1
    continue
  fi

  args=(-q)  # no path: pytest runs its testpaths (tests/) unless paths are passed on
  [[ -n "$mark" ]] && args+=(-m "$mark")
  log="$(mktemp)"
  "${leg_env[@]}" "$VPY" -m pytest "${args[@]}" "${pytest_args[@]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  last="$(grep -v '^\s*$' "$log" | tail -n 1)"
  rm -f "$log"
  took="$((SECONDS - start)) s"
  if [[ $rc -eq 0 ]]; then
    summary+=("passed   ${label}, ${took}: ${last}")
  elif [[ $rc -eq 5 && "$what" != "whole suite" && ( -n "$user_mark" || ${#pytest_args[@]} -gt 0 ) ]]; then
    summary+=("nothing  ${label}: none of the tests you selected reaches ComfyUI")
  else
    [[ $rc -eq 5 ]] && last="pytest collected no tests; treated as a failure"
    summary+=("FAILED   ${label} (pytest exit ${rc}), ${took}: ${last}")
    status=1
  fi
done

echo
echo "=== scripts/test.sh summary ==="
printf '%s\n' "${summary[@]}"
exit "$status"
