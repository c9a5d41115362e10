# SPDX-License-Identifier: GPL-3.0-or-later
"""Smoke test of the modes benchmark through its GPU script's CPU path, and of the GPU script's checks.

``bash bench/run_gpu.sh`` is meant for a machine with an NVIDIA GPU (none
here); ``KLORA_BENCH_DEVICE=cpu`` runs the very same script and driver on
the CPU with the smoke settings (``--quick``: the tests' tiny SD1.5 UNet),
into a temporary folder, so the committed results are never touched.  About
a minute on this project's 2-core machine (four worker processes, each
importing ComfyUI).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import comfy_env

REPO = comfy_env.REPO_ROOT


def _run_gpu_script(args, **env):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(REPO / "bench" / "run_gpu.sh"), *args], cwd=REPO, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_script_cpu_path_writes_table_and_json(tmp_path):
    try:
        root = comfy_env.find_comfy_root()
    except comfy_env.ComfyEnvError as exc:
        pytest.fail(str(exc), pytrace=False)
    proc = _run_gpu_script(["--quick", "--out-dir", str(tmp_path), "--date", "smoke"], KLORA_BENCH_DEVICE="cpu",
                           COMFYUI_PATH=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.rstrip("\n").splitlines()
    assert lines[-1].startswith("Goal: bypass peak growth"), lines[-3:]
    assert any(line.startswith("| rank | mode |") for line in lines)
    data = json.loads((tmp_path / "smoke-modes-cpu-quick.json").read_text())
    assert (tmp_path / "smoke-modes-cpu-quick.md").read_text() == proc.stdout
    rank = data["time"]["ranks"]["4"]
    assert set(rank["median_image_s"]) == {"bake", "bypass", "merge"}
    assert rank["relative_to_bake"]["bypass"] <= 1e-5  # float32: bypass and bake give the same image
    assert rank["relative_to_bake"]["merge"] > 1e-3    # a direct merge does not
    for method in ("bake", "bypass", "merge"):
        cell = data["memory"]["4"][method]
        assert cell["measure"] == "process RSS" and cell["peak_mib"] > 0


def test_gpu_script_refuses_without_comfyui_or_cuda(tmp_path):
    proc = _run_gpu_script(["--quick"], COMFYUI_PATH=str(tmp_path))
    assert proc.returncode == 2 and "COMFYUI_PATH" in proc.stderr
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be shown")
    proc = _run_gpu_script(["--quick", "--out-dir", str(tmp_path)], COMFYUI_PATH=str(comfy_env.find_comfy_root()))
    assert proc.returncode != 0 and "has no CUDA torch" in proc.stderr
    assert not list(tmp_path.iterdir())
