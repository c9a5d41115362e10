"""The repository's own files as a git clone hands them out, for tests that read every tracked file."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def git(*args) -> str:
    """``git -C <repo> ARGS`` output; the calling test is skipped where there is no git checkout."""
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], check=True, capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"needs a git checkout of the pack and git on PATH ({exc})")


def tracked_files() -> list:
    """Paths in the git index that exist in the working tree (a clone's file list, today's content)."""
    names = [n for n in git("ls-files", "-z").split("\0") if n]
    return [n for n in names if (REPO_ROOT / n).is_file()]
