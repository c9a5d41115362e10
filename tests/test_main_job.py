"""The main job end to end: ``python -m klora_core run`` starts a real ComfyUI and renders.

Each run generates (or reuses, from the cache folder) the demo models, starts
the server on a free loopback port with this pack, posts the workflow and
copies the results; nothing is mocked.  About 15-25 s per run on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=300, tmpdir=None):
    threads = os.environ.get("KLORA_TEST_THREADS", "1")
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if tmpdir is not None:  # where the run's temporary ComfyUI folders go (checked for leftovers)
        Path(tmpdir).mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run([sys.executable, "-m", "klora_core", "run", *args], cwd=str(REPO_ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)


def _png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_run_renders_image_map_and_report(tmp_path):
    out = tmp_path / "out"
    proc = _run("--steps", "4", "--out", str(out), tmpdir=tmp_path / "tmp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list((tmp_path / "tmp").glob("klora-run-*")), "the run left its temporary folder behind"
    assert _png_size(out / "klora_seed0.png") == (128, 128)
    assert _png_size(out / "selection_map.png")[0] > 100
    report = (out / "report.txt").read_text()
    assert "gamma" in report and "K-LoRA on SD15" in report
    assert "first step" in report and "last step" in report
    graph = json.loads((out / "workflow_api.json").read_text())
    types = {n["class_type"] for n in graph.values()}
    assert {"UNETLoader", "CLIPLoader", "VAELoader", "KLoRASubjectLoader", "KLoRAStyleLoader", "KLoRAFuse",
            "CLIPTextEncode", "KSampler", "VAEDecode", "SaveImage"} <= types
    assert "Prompt executed" in (out / "comfyui.log").read_text()
    assert f"wrote {out / 'klora_seed0.png'}" in proc.stdout
    assert "KSampler" in proc.stderr and "4/4" in proc.stderr  # the progress bar


def test_run_grid_draws_a_contact_sheet(tmp_path):
    out = tmp_path / "grid"
    proc = _run("--grid", "1.0,2.0", "0.5", "--steps", "2", "--width", "64", "--height", "64", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = sorted(p.name for p in (out / "grid").glob("alpha*.png"))
    assert cells == ["alpha1_beta0.5_seed0.png", "alpha2_beta0.5_seed0.png"]
    width, height = _png_size(out / "grid_seed0.png")
    assert height > 2 * 64  # two rows (alphas)
    # Beside each image its selection map: alpha changes which LoRA the weights take (demo pair, 2 steps:
    # 7 weights keep the subject at step 1 with alpha 1, 1 with alpha 2), which the noise images cannot show.
    maps = [out / "grid" / f"map_alpha{a}_beta0.5_seed0.png" for a in (1, 2)]
    assert maps[0].read_bytes() != maps[1].read_bytes()
    map_w, map_h = _png_size(maps[0])
    assert width > 64 + map_w * min(1.0, 256 / map_h) - 10  # one column = image + map
    report = (out / "report.txt").read_text()
    assert report.count("gamma") == 2 and "alpha 1, beta 0.5" in report and "alpha 2, beta 0.5" in report


def test_run_bad_input_is_one_line(tmp_path):
    proc = _run("--subject", str(tmp_path / "nope" / "dog.safetensors"), "--style", "x.safetensors",
                "--out", str(tmp_path / "o"), timeout=120, tmpdir=tmp_path / "tmp")
    assert proc.returncode == 1
    assert not list((tmp_path / "tmp").glob("klora-run-*")), "a failed run left its temporary folder behind"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("klora: error: subject:") and "no such file" in lines[0]


def test_run_missing_lora_name_is_reported_by_the_server(tmp_path):
    proc = _run("--subject", "not_in_any_folder.safetensors", "--style", "neither.safetensors", "--steps", "1",
                "--width", "64", "--height", "64", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("klora: error:") and "not_in_any_folder.safetensors" in last


def test_run_help_documents_every_flag():
    proc = subprocess.run([sys.executable, "-m", "klora_core", "run", "--help"], cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--comfyui", "--checkpoint", "--subject", "--style", "--prompt", "--negative", "--seed",
                 "--steps", "--cfg", "--sampler", "--scheduler", "--width", "--height", "--alpha", "--beta",
                 "--pattern", "--out", "--grid"):
        assert flag in proc.stdout
