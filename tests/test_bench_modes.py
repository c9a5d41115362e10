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
@pytest.mark.comfyui
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


def test_gpu_model_config_is_full_size_sd15(comfy):
    """The GPU run's UNet (built here on the meta device: shapes only) is SD1.5's: 859.5 M parameters."""
    import importlib.util

    import comfy.supported_models
    import torch

    saved_path, saved_common = list(sys.path), sys.modules.get("common")
    try:  # bench/modes.py puts bench/ on sys.path and imports bench/common.py: undo both afterwards
        spec = importlib.util.spec_from_file_location("bench_modes", REPO / "bench" / "modes.py")
        modes = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modes)
        config = modes.SETTINGS[("cuda", False)]["model"]
    finally:
        sys.path[:] = saved_path
        if saved_common is None:
            sys.modules.pop("common", None)
        else:
            sys.modules["common"] = saved_common
    model_config = comfy.supported_models.SD15(dict(config))
    model_config.set_inference_dtype(torch.float16, None)
    unet = model_config.get_model({}, device=torch.device("meta")).diffusion_model
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    attention = [n for n, _ in unet.named_parameters() if ".attn" in n and n.endswith(("to_q.weight", "to_k.weight",
                                                                                       "to_v.weight", "to_out.0.weight"))]
    assert len(attention) == 128  # 16 transformer blocks x 2 attentions x 4 projections (bench/cost_model.py)


@pytest.mark.comfyui
def test_gpu_script_refuses_without_comfyui_or_cuda(tmp_path):
    proc = _run_gpu_script(["--quick"], COMFYUI_PATH=str(tmp_path))
    assert proc.returncode == 2 and "COMFYUI_PATH" in proc.stderr
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be shown")
    proc = _run_gpu_script(["--quick", "--out-dir", str(tmp_path)], COMFYUI_PATH=str(comfy_env.find_comfy_root()))
    assert proc.returncode != 0 and "has no CUDA torch" in proc.stderr
    assert not list(tmp_path.iterdir())
