"""Choosing the ComfyUI under test: the cached versions, ``COMFYUI_PATH`` and the ``comfyui`` marker.

No ComfyUI is imported or started here.  Checked:
- ``klora_core.cli.comfy.server.find_comfy_root`` (which the tests' ``support.comfy_env``
  and every server they start use) reads the marker file of the version
  ``KLORA_COMFYUI_VERSION`` names, in the layout scripts/setup_comfyui_env.sh
  writes; ``COMFYUI_PATH`` wins; a missing version says which command builds it;
- scripts/setup_comfyui_env.sh refuses an unknown version and a tarball whose
  sha256 is wrong (exit 3, loud warning, nothing built), and scripts/test.sh
  then skips that leg without failing;
- tests/conftest.py marks tests that use the ``comfy`` fixture or are
  ``server`` tests ``comfyui``, keeps the explicit marks, and leaves
  pure-torch tests unmarked (collected in a subprocess, as scripts/test.sh's
  second leg selects them).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from klora_core.cli.comfy import server as runner
from klora_core.errors import KLoRAError

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "scripts" / "setup_comfyui_env.sh"


def _fake_comfy(root: Path) -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "nodes.py").write_text("")
    return root


def _cached_env(base: Path, version_dir: str, name: str) -> Path:
    """A cached environment as the setup script leaves it: ``comfyui_path`` naming the tree."""
    env = base / version_dir if version_dir else base
    tree = _fake_comfy(env / name)
    (env / "comfyui_path").write_text(f"{tree}\n")
    return tree


def test_version_selects_the_cached_tree(tmp_path, monkeypatch):
    old = _cached_env(tmp_path, "", "ComfyUI-0.3.75")
    new = _cached_env(tmp_path, "comfyui-0.8.0", "ComfyUI-0.8.0")
    monkeypatch.setenv("KLORA_ENV_DIR", str(tmp_path))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("KLORA_COMFYUI_VERSION", raising=False)
    assert runner.find_comfy_root() == old.resolve()
    monkeypatch.setenv("KLORA_COMFYUI_VERSION", "0.3.75")
    assert runner.find_comfy_root() == old.resolve()
    monkeypatch.setenv("KLORA_COMFYUI_VERSION", "0.8.0")
    assert runner.find_comfy_root() == new.resolve()
    own = _fake_comfy(tmp_path / "own")
    monkeypatch.setenv("COMFYUI_PATH", str(own))
    assert runner.find_comfy_root() == own.resolve()
    assert runner.find_comfy_root(str(old)) == old.resolve()


def test_missing_version_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KLORA_ENV_DIR", str(tmp_path))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("KLORA_COMFYUI_VERSION", "0.8.0")
    with pytest.raises(KLoRAError) as err:
        runner.find_comfy_root()
    message = str(err.value)
    assert str(tmp_path / "comfyui-0.8.0" / "comfyui_path") in message
    assert "setup_comfyui_env.sh --comfyui 0.8.0" in message


def _script(path: Path, *args, env_dir: Path, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "KLORA_COMFYUI_VERSION")}
    full.update(KLORA_ENV_DIR=str(env_dir), **env)
    return subprocess.run(["bash", str(path), *args], cwd=REPO, env=full, capture_output=True, text=True,
                           timeout=120)


def test_setup_refuses_unknown_version(tmp_path):
    proc = _script(SETUP, "--comfyui", "0.1.0", env_dir=tmp_path / "env")
    assert proc.returncode == 2, proc.stderr
    assert "unknown ComfyUI version '0.1.0'" in proc.stderr
    assert not (tmp_path / "env").exists()


@pytest.mark.parametrize("tarball", ["missing", "wrong-sha"])
def test_setup_without_a_good_tarball_warns_and_builds_nothing(tmp_path, tarball):
    path = tmp_path / "ComfyUI-0.8.0-src.tar.gz"
    if tarball == "wrong-sha":
        path.write_bytes(b"not the release")
    proc = _script(SETUP, "--comfyui", "0.8.0", env_dir=tmp_path / "env", KLORA_COMFYUI_080_TARBALL=str(path))
    assert proc.returncode == 3, proc.stderr
    assert "WARNING: ComfyUI 0.8.0 test environment NOT built" in proc.stderr
    assert ("expected bdbbf662" in proc.stderr) == (tarball == "wrong-sha"), proc.stderr
    assert proc.stdout == ""  # no python path: nothing to run tests with
    assert not (tmp_path / "env").exists()


def test_test_sh_skips_a_leg_whose_source_is_missing(tmp_path):
    proc = _script(REPO / "scripts" / "test.sh", "--comfyui", "0.8.0", env_dir=tmp_path / "env",
                   KLORA_COMFYUI_080_TARBALL=str(tmp_path / "absent.tar.gz"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING: ComfyUI 0.8.0 test environment NOT built" in proc.stderr
    assert "SKIPPED  ComfyUI 0.8.0 (ComfyUI-facing tests)" in proc.stdout


def test_comfyui_marker_selects_the_comfyui_facing_tests():
    files = ["tests/test_core.py", "tests/test_fuse_exact.py", "tests/test_server.py", "tests/test_install_paths.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "comfyui", *files],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    # fuse_exact: the comfy fixture (through the model fixtures); server: the marker; install_paths: explicit
    assert selected == set(files[1:]), proc.stdout[-3000:]
