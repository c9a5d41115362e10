#!/usr/bin/env bash
# Run the whole test suite in the cached test environment.
#
#   bash scripts/test.sh [pytest args...]      e.g. bash scripts/test.sh -k cli -x
#
# Builds the environment on first use (scripts/setup_comfyui_env.sh: a venv
# with CPU torch and ComfyUI 0.3.75, cached in ~/.cache/klora-comfyui or
# $KLORA_ENV_DIR; set COMFYUI_PATH to test against your own ComfyUI checkout),
# then runs pytest from the repository root.  Exits with pytest's status;
# "no tests collected" (pytest exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VPY="$(bash scripts/setup_comfyui_env.sh | tail -n 1)"
if [[ ! -x "$VPY" ]]; then
  echo "scripts/test.sh: environment setup did not print a python path (got '$VPY')" >&2
  exit 1
fi

set +e
"$VPY" -m pytest -q tests "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "scripts/test.sh: pytest collected no tests; treating that as a failure" >&2
fi
exit "$rc"
