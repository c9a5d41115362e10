"""One convention for the whole command line (``map``, ``inspect``, ``run``, ``scripts/demo.sh``).

- Bad usage is exit status 2 with one ``klora: error:`` line naming the option
  with its dashes, whether argparse or a later check finds it (before: 1 for
  ``run --width 100``, ``--grid 1,20 0.5`` or only ``--subject``).
- No prefix matching: ``--step 30`` is not ``--steps 30`` but an error that
  suggests ``--steps``.
- A sampler or scheduler name ComfyUI does not have fails before the server
  starts, naming the allowed values (before: "ComfyUI saved no image").
- A missing package (torch, numpy, safetensors, Pillow) gives the same one
  line from every subcommand (before: "unexpected ModuleNotFoundError" from
  ``map``, "the 'safetensors' package is required" from ``inspect``).
- ``bash scripts/demo.sh --help`` answers at once, building nothing.

The expected values are written out here (the options' documented ranges,
ComfyUI's sampler list read from its ``/object_info`` where a server runs).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import comfy_env

REPO = Path(__file__).resolve().parent.parent
PROG = "python -m klora_core"


def cli(*args, env_extra=None, timeout=120, python=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(env_extra or {})
    return subprocess.run([python or sys.executable, "-m", "klora_core", *map(str, args)], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("klora: error: "), lines[0]
    return lines[0]


# (argv, words the one line must contain); each must exit 2 before any work is done.
USAGE_ERRORS = [
    (["run", "--width", "100"], ["--width", "multiple of 8", "run --help"]),
    (["run", "--height", "36"], ["--height"]),
    (["run", "--alpha", "20"], ["--alpha", "between 0 and 10"]),
    (["run", "--beta", "-3"], ["--beta", "between -1 and 10"]),
    (["run", "--subject", "dog.safetensors"], ["--subject", "--style"]),
    (["run", "--style", "ink.safetensors"], ["--subject", "--style"]),
    (["run", "--checkpoint", "sd15.safetensors"], ["--checkpoint", "--subject"]),
    (["run", "--grid", "1,20", "0.5"], ["--grid", "between 0 and 10", "20"]),
    (["run", "--grid", "1", "0.5,-2"], ["--grid", "between -1 and 10"]),
    (["run", "--grid", "1,x", "0.5"], ["--grid"]),
    (["run", "--timeout", "0"], ["--timeout"]),
    (["run", "--steps", "151"], ["--steps", "between 1 and 150"]),
    (["run", "--subject-strength", "nan"], ["--subject-strength", "finite"]),
    (["run", "--step", "30"], ["--step", "did you mean --steps?", "run --help"]),
    (["run", "--sampler"], ["--sampler"]),
    (["map", "--step", "30"], ["--step", "did you mean --steps?", "map --help"]),
    (["map", "--alph", "2"], ["did you mean --alpha?"]),
    (["map", "only_subject.safetensors"], ["SUBJECT and STYLE", "map --help"]),
    (["map", "--out", "map.jpg"], ["--out", ".png"]),
    (["map", "--steps", "0"], ["--steps"]),
    (["inspect", "--beta", "11"], ["--beta", "between -1 and 10"]),
    (["inspect", "--pattern", "t"], ["--pattern"]),
    (["inspect", "a.safetensors"], ["SUBJECT and STYLE", "inspect --help"]),
    ([], ["required"]),
]


@pytest.mark.parametrize("argv, words", USAGE_ERRORS, ids=[" ".join(a) or "nothing" for a, _ in USAGE_ERRORS])
def test_bad_usage_is_status_2_and_names_the_option(argv, words, tmp_path):
    from klora_core.cli import main

    # In-process (fast): argparse's own errors raise SystemExit(2), later checks return 2.
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main.main([*argv, *(["--out", str(tmp_path / "never")] if argv[:1] == ["run"] else [])])
        except SystemExit as exc:
            code = exc.code
    assert code == 2, (argv, err.getvalue())
    line = one_error_line(type("P", (), {"stderr": err.getvalue()})())
    for word in words:
        assert word in line, (argv, line)
    assert not (tmp_path / "never").exists(), "bad usage must not start any work"


def test_typos_are_not_prefix_matched():
    from klora_core.cli import main

    parser = main.build_parser()
    for argv in (["map", "--step", "30"], ["inspect", "--subject-str", "2"], ["run", "--seed", "1", "--wid", "64"]):
        with pytest.raises(SystemExit) as info:
            main.parse_arguments(parser, argv)
        assert info.value.code == 2
    assert main.parse_arguments(parser, ["map", "--steps", "30"]).steps == 30


@pytest.mark.comfyui  # reads the sampler names of the ComfyUI under test
def test_unknown_sampler_fails_before_the_server_starts(tmp_path):
    root = comfy_env.find_comfy_root()
    started = time.monotonic()
    proc = cli("run", "--comfyui", root, "--sampler", "eulr", "--out", tmp_path / "o")
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert "--sampler 'eulr'" in line and "did you mean euler?" in line and "dpmpp_2m" in line, line
    assert "starting ComfyUI" not in proc.stdout and not (tmp_path / "o" / "comfyui.log").exists()
    assert elapsed < 30, elapsed  # no server start (a start alone takes 10 s or more here)
    proc = cli("run", "--comfyui", root, "--scheduler", "karas", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "did you mean karras?" in one_error_line(proc)


@pytest.mark.comfyui  # reads the sampler names of the ComfyUI under test
def test_sampler_names_come_from_comfyui_and_defer_to_other_packs(tmp_path):
    """Read statically from comfy/samplers.py; with another custom node pack installed (it may add
    samplers at run time) the server's own validation decides instead."""
    from klora_core.cli.comfy import sampler_names

    root = comfy_env.find_comfy_root()
    names = sampler_names.read_names(root)
    assert {"euler", "euler_ancestral", "dpmpp_2m", "ddim", "uni_pc"} <= set(names["sampler"])
    assert {"normal", "karras", "simple", "sgm_uniform"} <= set(names["scheduler"])
    assert sampler_names.unknown_name_message(root, "sampler", "euler", "klora-fusion") is None
    fake = tmp_path / "ComfyUI"
    (fake / "comfy").mkdir(parents=True)
    (fake / "comfy" / "samplers.py").write_text((root / "comfy" / "samplers.py").read_text())
    (fake / "custom_nodes").mkdir()
    assert "eulr" in sampler_names.unknown_name_message(fake, "sampler", "eulr", "klora-fusion")
    (fake / "custom_nodes" / "klora-fusion").mkdir()
    assert sampler_names.unknown_name_message(fake, "sampler", "eulr", "klora-fusion") is not None
    (fake / "custom_nodes" / "RES4LYF").mkdir()
    assert sampler_names.unknown_name_message(fake, "sampler", "eulr", "klora-fusion") is None
    (fake / "comfy" / "samplers.py").write_text("SAMPLER_NAMES = make_names()\n")
    assert sampler_names.read_names(fake) is None


def _blocker(tmp_path: Path, module: str) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import <module>`` fail as if it were not installed."""
    folder = tmp_path / f"no_{module}"
    (folder / module).mkdir(parents=True)
    (folder / module / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n")
    return folder


@pytest.mark.parametrize("module, pip_name", [("numpy", "numpy"), ("safetensors", "safetensors"), ("PIL", "Pillow"),
                                              ("torch", "torch")])
def test_a_missing_package_is_one_message_from_every_subcommand(tmp_path, module, pip_name):
    blocker = _blocker(tmp_path, module)
    lines = {}
    for command in ("map", "inspect", "run"):
        extra = ["--out", tmp_path / f"{command}.png"] if command != "run" else ["--out", tmp_path / "run"]
        proc = cli(command, *extra, env_extra={"PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"})
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        lines[command] = one_error_line(proc)
    for command, line in lines.items():
        assert line == lines["map"].replace("'map'", f"'{command}'"), lines
        assert f"missing here: {pip_name}." in line and f"pip install {pip_name}" in line, line
        assert "ComfyUI's python" in line and "unexpected" not in line, line
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "run").exists()


def test_help_needs_no_package(tmp_path):
    """``--help`` of every subcommand works in a python without torch, numpy, safetensors or Pillow."""
    blockers = os.pathsep.join(str(_blocker(tmp_path, m)) for m in ("torch", "numpy", "safetensors", "PIL"))
    for command in ("map", "inspect", "run"):
        proc = cli(command, "--help", env_extra={"PYTHONPATH": f"{blockers}{os.pathsep}{REPO}"})
        assert proc.returncode == 0 and "usage:" in proc.stdout, (command, proc.stderr)


def test_demo_help_builds_nothing(tmp_path):
    env_dir = tmp_path / "fresh-env"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["KLORA_ENV_DIR"] = str(env_dir)
    for flag in ("--help", "-h"):
        started = time.monotonic()
        # Its own process group: if it starts building after all, the whole build is stopped, not just bash.
        proc = subprocess.Popen(["bash", "scripts/demo.sh", "--steps", "4", flag], cwd=str(REPO), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail("demo.sh --help did not answer within 30 s (it was building the environment)")
        assert proc.returncode == 0, err
        assert "usage: python -m klora_core run" in out and "--grid" in out
        assert time.monotonic() - started < 20
        assert not env_dir.exists(), "demo.sh --help started building the environment"
