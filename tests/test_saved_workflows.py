# SPDX-License-Identifier: GPL-3.0-or-later
"""Workflows saved with version 0.1.0 (V1 nodes) still load and run on the current nodes.

``tests/fixtures/workflows-0.1.0`` holds the example workflows exactly as
0.1.0 shipped them (UI and API format), copied once, so a later
regeneration of workflows/ cannot hide a break.  Against a real ComfyUI
server with this pack (whichever ComfyUI version the run uses):

- UI files: every node type, socket type, link and widget value is valid for
  the server's current node definitions, and the API prompt the frontend
  makes of the file (widget values assigned by position, as it does on load)
  is exactly the saved API file: node ids, input names, widget order and
  output order are unchanged (inputs added since 0.1.0 come last, optional,
  with a default, and take that default);
- API files: each runs to completion on the small detectable models, with
  the K-LoRA nodes really executed (fresh LoRA file names, so nothing comes
  from ComfyUI's cache) and the fused model, report and map where 0.1.0 put them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support import workflow_tools as wt

pytestmark = [pytest.mark.server, pytest.mark.slow]

SAVED = Path(__file__).resolve().parent / "fixtures" / "workflows-0.1.0"
#: The example workflows 0.1.0 shipped (the copies' names; later workflows are not in this set).
NAMES_0_1_0 = ("klora_sdxl_subject_style", "klora_flux_s_star", "klora_sd15", "klora_img2img")


@pytest.fixture(scope="session")
def live(request):
    return wt.live_server(request)


def test_fixtures_are_the_0_1_0_files():
    """The copies are whole: every example workflow of 0.1.0 in both formats, with the K-LoRA nodes."""
    assert sorted(p.stem for p in SAVED.glob("*.json")) == sorted(NAMES_0_1_0)
    assert sorted(p.stem for p in (SAVED / "api").glob("*.json")) == sorted(NAMES_0_1_0)
    for name in NAMES_0_1_0:
        ui, api = wt.load_ui(name, SAVED), wt.load_api(name, SAVED)
        types = {n["type"] for n in ui["nodes"]}
        assert {"KLoRASubjectLoader", "KLoRAStyleLoader", "KLoRAFuse"} <= types, name
        assert {"KLoRASubjectLoader", "KLoRAStyleLoader", "KLoRAFuse"} <= {n["class_type"] for n in api.values()}


@pytest.mark.parametrize("name", NAMES_0_1_0)
def test_saved_ui_workflow_loads(live, name):
    ui = wt.load_ui(name, SAVED)
    problems = wt.validate_ui(ui, live.object_info, live.names, saved_earlier=True)
    assert not problems, f"{name}.json (0.1.0):\n" + "\n".join(problems)
    assert wt.ui_to_api(ui, live.object_info) == wt.without_meta(wt.load_api(name, SAVED)), (
        f"{name}: the current nodes read the 0.1.0 UI file differently from how 0.1.0 did")


def _fresh_lora_names(live, name: str) -> dict:
    """Copies of the generated LoRAs under names no other test used (the loaders must run, not be cached)."""
    names = dict(live.names)
    for role in ("subject", "style"):
        fresh = f"klora-saved-{name}-{role}.safetensors"
        shutil.copyfile(live.server.loras_dir / live.names[role], live.server.loras_dir / fresh)
        names[role] = fresh
    return names


@pytest.mark.parametrize("name", NAMES_0_1_0)
def test_saved_api_workflow_runs(live, name):
    prompt = wt.adapt_api(wt.load_api(name, SAVED), _fresh_lora_names(live, name))
    entry = live.server.run(prompt, timeout=240)
    assert entry["status"]["status_str"] == "success", entry["status"]
    ids = {v["class_type"]: k for k, v in prompt.items()}
    fuse_id, outputs = ids["KLoRAFuse"], entry["outputs"]
    assert fuse_id in outputs, f"K-LoRA Fuse did not run: {entry['status']}"
    report = outputs[fuse_id]["text"][0]
    assert f"pattern {prompt[fuse_id]['inputs']['pattern']}," in report and "gamma" in report, report
    assert outputs[fuse_id]["images"][0]["filename"].startswith("klora_map_")
    # output order as in 0.1.0: model (0) -> the sampler, selection_map (2) -> PreviewImage
    sampler = prompt[ids["KSampler"]]["inputs"]["model"]
    preview = prompt[ids["PreviewImage"]]["inputs"]["images"]
    assert sampler == [fuse_id, 0] and preview == [fuse_id, 2]
    assert outputs[ids["PreviewImage"]]["images"], "the selection map reached no PreviewImage"
    assert live.server.output_file(entry, ids["SaveImage"]).stat().st_size > 0
