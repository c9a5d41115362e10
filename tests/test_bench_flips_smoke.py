# SPDX-License-Identifier: GPL-3.0-or-later
"""Smoke test of the flips benchmark: ``bench/flips.py --quick`` writes the table and the JSON.

Tiny SDXL-shaped UNet, one round, the three memory processes: about a minute
on this project's 2-core machine, most of it process start-up.  The full-size
run (``bash bench/flips.sh``) is a benchmark, not a test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import comfy_env

REPO = comfy_env.REPO_ROOT


@pytest.mark.slow
def test_flips_bench_quick(tmp_path):
    try:
        comfy_env.find_comfy_root()
    except comfy_env.ComfyEnvError as exc:
        pytest.fail(str(exc), pytrace=False)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "flips.py"), "--quick", "--out-dir", str(tmp_path), "--date", "smoke"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "smoke-flips-cpu-quick.json").read_text())
    assert (tmp_path / "smoke-flips-cpu-quick.md").read_text() == proc.stdout
    size = data["time"]["sizes"]["64"]
    assert size["klora_ways_bit_identical"] is True
    med = size["median"]
    assert med["one by one"]["computed"] > 0 and med["one by one"]["swapped"] == 0
    assert med["kept"]["computed"] == 0 and med["kept"]["swapped"] > 0  # second kept image: swaps only
    assert set(data["memory"]) == {"merge", "batched", "kept"} and data["memory"]["kept"]["kept_bytes"] > 0
    assert "| 64 px | kept |" in proc.stdout and "bit-identical latents: True" in proc.stdout
