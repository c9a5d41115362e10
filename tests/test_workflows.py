"""The example workflows in workflows/ against a real ComfyUI server with this pack.

UI (graph) files: every node type exists in /object_info, every link joins an
output and an input of the same type, every widget value is valid for its
input (combo choices after substituting the generated model names, numeric
ranges, seed control values), version fields as the 0.3.75 frontend writes
them.  API files: the same graph as the UI file (same nodes, values and
links), and each one runs to completion on the small detectable models; the
model-family workflows (Wan 2.x, Qwen-Image, Z-Image) run on tiny models of
their own family with LoRAs in two trainers' namings (support/family_workflows.py
says what stands in for the multi-GB text encoders and the undetectable models).
"""
from __future__ import annotations

import pytest

from support import workflow_tools as wt

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="session")
def live(request):
    return wt.live_server(request)


def test_generator_is_in_sync():
    """workflows/ holds exactly what scripts/make_workflows.py writes (edit the script, not the JSON)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_workflows", wt.REPO_ROOT / "scripts" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stale = [str(p.relative_to(wt.REPO_ROOT)) for p, text in module.rendered().items()
             if not p.is_file() or p.read_text(encoding="utf-8") != text]
    assert not stale, f"regenerate with python scripts/make_workflows.py: {stale}"


@pytest.mark.parametrize("name", wt.ALL_WORKFLOW_NAMES)
def test_ui_workflow_is_valid(live, name):
    workflow = wt.load_ui(name)
    problems = wt.validate_ui(workflow, live.object_info, live.names)
    assert not problems, f"{name}.json:\n" + "\n".join(problems)
    types = [n["type"] for n in workflow["nodes"]]
    for needed in ("KLoRASubjectLoader", "KLoRAStyleLoader", "KLoRAFuse", "Note"):
        assert types.count(needed) == 1, f"{name}: {needed} x{types.count(needed)}"
    note = next(n for n in workflow["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "trigger" in note and "Load" in note and "models/" in note, note


@pytest.mark.parametrize("name", wt.ALL_WORKFLOW_NAMES)
def test_api_matches_ui(live, name):
    """workflows/api/<name>.json is the UI graph in API format: same nodes, widget values and links."""
    api, expected = wt.without_meta(wt.load_api(name)), wt.ui_to_api(wt.load_ui(name), live.object_info)
    assert set(api) == set(expected)
    for node_id, entry in api.items():
        assert entry == expected[node_id], f"{name} node {node_id} ({entry['class_type']})"


def test_fuse_settings_follow_the_paper():
    fuse = {name: next(n for n in wt.load_api(name).values() if n["class_type"] == "KLoRAFuse")["inputs"]
            for name in wt.ALL_WORKFLOW_NAMES}
    sdxl = fuse["klora_sdxl_subject_style"]
    assert (sdxl["pattern"], sdxl["alpha"], sdxl["beta"], sdxl["scope"]) == ("s", 1.5, 0.5, "attention projections")
    flux = fuse["klora_flux_s_star"]
    assert (flux["pattern"], flux["alpha"], flux["beta"]) == ("s*", 1.5, 1.275)
    for name, inputs in fuse.items():
        sampler = next(n for n in wt.load_api(name).values() if n["class_type"] == "KSampler")["inputs"]
        assert inputs["map_steps"] == sampler["steps"], f"{name}: map_steps should equal the sampler's steps"
    img2img = next(n for n in wt.load_api("klora_img2img").values() if n["class_type"] == "KSampler")["inputs"]
    assert img2img["denoise"] < 1.0 and fuse["klora_img2img"]["progress_measure"] == "noise level"


@pytest.mark.parametrize("name", wt.WORKFLOW_NAMES)
def test_api_workflow_runs_on_small_models(live, name):
    prompt = wt.adapt_api(wt.load_api(name), live.names)
    entry = live.server.run(prompt, timeout=240)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    fuse_id = next(k for k, v in prompt.items() if v["class_type"] == "KLoRAFuse")
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    preview_id = next(k for k, v in prompt.items() if v["class_type"] == "PreviewImage")
    saved = live.server.output_file(entry, save_id)
    assert saved.is_file() and saved.stat().st_size > 0
    assert saved.name.startswith(prompt[save_id]["inputs"]["filename_prefix"].split("/")[-1])
    assert outputs[preview_id]["images"], "the selection map reached no PreviewImage"
    # The fuse node shows its map and report on the node (ui.images / ui.text).  ComfyUI reports no
    # ui output for a node it took from its cache (an earlier workflow had the same fuse inputs).
    cached = {node for kind, data in entry["status"].get("messages", []) if kind == "execution_cached"
              for node in data.get("nodes", [])}
    if fuse_id not in outputs:
        assert fuse_id in cached, f"K-LoRA Fuse neither ran nor came from the cache: {entry['status']}"
        return
    fuse_ui = outputs[fuse_id]
    assert fuse_ui["images"][0]["filename"].startswith("klora_map_")
    report = fuse_ui["text"][0]
    pattern = prompt[fuse_id]["inputs"]["pattern"]
    assert f"pattern {pattern}," in report and "gamma" in report, report
    assert "24 weights switch per step" in report, report


@pytest.mark.parametrize("name", wt.FAMILY_WORKFLOW_NAMES)
def test_family_workflow_runs_on_tiny_models_of_its_family(live, name):
    from support import family_models, family_workflows

    files = family_workflows.write_files(live.server, name)
    prompt = family_workflows.adapt_api(wt.load_api(name), files)
    entry = live.server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    save_type = "SaveAnimatedWEBP" if name == "klora_wan_t2v" else "SaveImage"
    save_id = next(k for k, v in prompt.items() if v["class_type"] == save_type)
    saved = live.server.output_file(entry, save_id)
    assert saved.is_file() and saved.stat().st_size > 0
    preview_id = next(k for k, v in prompt.items() if v["class_type"] == "PreviewImage")
    assert outputs[preview_id]["images"], "the selection map reached no PreviewImage"
    fuse_id = next(k for k, v in prompt.items() if v["class_type"] == "KLoRAFuse")
    report = outputs[fuse_id]["text"][0]
    family = family_workflows.RUNS[name].family
    assert report.startswith(f"K-LoRA on {family_models.FAMILIES[family].config_class}:"), report
    assert f"{files['subject_tensors']} tensors matched, 0 unmatched" in report, report
    assert f"{files['style_tensors']} matched, 0 unmatched" in report, report
    assert "weights switch per step" in report and "WARNING" not in report, report


def test_a_workflow_saved_with_0_1_0_runs_identically(live):
    """0.1.0 saved beta -1 ("the pattern's paper value"); the default is now that value itself (0.5 for s).
    The saved API workflow must run, and give the same image as with beta 0.5 written out."""
    import json

    from PIL import Image

    legacy = wt.adapt_api(json.loads((wt.REPO_ROOT / "tests" / "data" / "workflow_0.1.0_sd15_api.json")
                                     .read_text(encoding="utf-8")), live.names)
    fuse_id = next(k for k, v in legacy.items() if v["class_type"] == "KLoRAFuse")
    save_id = next(k for k, v in legacy.items() if v["class_type"] == "SaveImage")
    sampler_id = next(k for k, v in legacy.items() if v["class_type"] == "KSampler")
    assert legacy[fuse_id]["inputs"]["beta"] == -1.0 and legacy[fuse_id]["inputs"]["pattern"] == "s"
    legacy[sampler_id]["inputs"]["seed"] = 90210  # not answered from an earlier test's cache
    explicit = json.loads(json.dumps(legacy))
    explicit[fuse_id]["inputs"]["beta"] = 0.5
    images, reports = [], []
    for prompt, tag in ((legacy, "legacy"), (explicit, "explicit")):
        prompt[save_id]["inputs"]["filename_prefix"] = f"klora/legacy_{tag}"
        entry = live.server.run(prompt, timeout=240)
        with Image.open(live.server.output_file(entry, save_id)) as image:
            images.append(image.tobytes())
        reports.append(entry["outputs"][fuse_id]["text"][0])
    assert images[0] == images[1]
    assert "beta 0.5;" in reports[0] and reports[0] == reports[1]
