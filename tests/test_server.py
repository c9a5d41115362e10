"""The pack inside a REAL ComfyUI server, driven over its HTTP API.

One server per module (tests/server_harness.py), stock loaders reading the
detectable demo models of tests/detectable_models.py:

(a) ``/object_info`` lists the three nodes with the documented inputs,
    outputs and a tooltip on every input;
(b) UNETLoader -> Load Subject/Style LoRA -> K-LoRA Fuse -> KSampler ->
    SaveLatent: the latent is finite, differs from the plain model, from each
    LoRA alone (stock LoraLoaderModelOnly) and from both stacked, the choice
    flips during sampling (the node's report), and a plain run AFTER the
    K-LoRA run is bit-identical to one before it (the shared base model is
    restored; see _plain for how caching is sidestepped);
(d) bad inputs (missing, corrupt, pickle with a payload, other model family)
    fail with one clear message naming the file, and the server keeps serving.

Budget: under ~90 s on 2 cores (server start ~8 s, then 64x64 images, 4 steps).
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from support import detectable_models
from support.server_harness import ComfyServer, ExecutionFailed, PromptRejected

pytestmark = [pytest.mark.server, pytest.mark.slow]

STEPS = 4
SEED = 7


@pytest.fixture(scope="module")
def server():
    with ComfyServer() as s:
        s.names = detectable_models.write_all(s)
        yield s


# --------------------------------------------------------------------------- graphs

def _graph(names, model_ref, sampler_extra=None, prefix="t", seed=SEED):
    """UNETLoader + CLIPLoader + 2 x CLIPTextEncode + EmptyLatentImage -> KSamplerAdvanced -> SaveLatent.

    ``model_ref``: ``(nodes_to_add, [node_id, output])`` supplying the MODEL.
    """
    extra_nodes, model = model_ref
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": names["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": names["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog, watercolor", "clip": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model, "add_noise": "enable", "noise_seed": seed, "steps": STEPS, "cfg": 2.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    g["6"]["inputs"].update(sampler_extra or {})
    g.update(extra_nodes)
    return g


def _plain(names, end_at_step=10000, **kw):
    # ComfyUI caches node outputs between prompts by input signature, so an
    # identical plain graph would not sample again.  end_at_step >= steps is a
    # no-op in comfy.samplers.KSampler.sample (sigmas are only cut when
    # last_step < len(sigmas) - 1), so different values give the same
    # computation with a different signature: a real re-run on the SAME cached
    # UNETLoader model object that the K-LoRA run used.
    return _graph(names, ({}, ["1", 0]), {"end_at_step": end_at_step}, prefix=f"plain{end_at_step}", **kw)


def _klora(names, subject=None, style=None, **fuse):
    nodes = {
        "10": {"class_type": "KLoRASubjectLoader", "inputs": {"lora_name": subject or names["subject"], "strength": 1.0}},
        "11": {"class_type": "KLoRAStyleLoader", "inputs": {"lora_name": style or names["style"], "strength": 1.0}},
        "12": {"class_type": "KLoRAFuse", "inputs": {
            "model": ["1", 0], "subject": ["10", 0], "style": ["11", 0], "pattern": "s", "alpha": 1.5,
            "beta": -1.0, "scope": "attention projections", "outside_scope": "both",
            "progress_measure": "noise level", "map_steps": STEPS, **fuse}},
    }
    return _graph(names, (nodes, ["12", 0]), prefix="klora")


def _lora_only(names, *loras):
    nodes, model = {}, ["1", 0]
    for n, lora in enumerate(loras):
        nid = str(20 + n)
        nodes[nid] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": model, "lora_name": lora, "strength_model": 1.0}}
        model = [nid, 0]
    return _graph(names, (nodes, model), prefix=f"lora{len(loras)}")


def _latent(server, entry):
    from safetensors.torch import load_file

    return load_file(str(server.output_file(entry, "7", "latents")))["latent_tensor"]


# --------------------------------------------------------------------------- (a)

def _assert_tooltips(info, node):
    for section in ("required", "optional"):
        for name, spec in info[node]["input"].get(section, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            assert opts.get("tooltip"), f"{node}.{name} has no tooltip"


def _choices(spec) -> list:
    """The choices of a combo input as /object_info lists it: a V1 list type, or V3's ("COMBO", {"options"})."""
    kind, *opts = spec
    return kind if isinstance(kind, list) else opts[0]["options"] if kind == "COMBO" else None


def test_object_info_lists_the_nodes(server):
    info = server.object_info()
    for node in ("KLoRASubjectLoader", "KLoRAStyleLoader", "KLoRAFuse"):
        assert node in info, f"{node} not registered; server log:\n{server.log_text()[-3000:]}"
        _assert_tooltips(info, node)
    assert info["KLoRASubjectLoader"]["display_name"] == "Load Subject LoRA"
    assert info["KLoRAStyleLoader"]["display_name"] == "Load Style LoRA"
    assert info["KLoRAFuse"]["display_name"] == "K-LoRA Fuse"

    for node, out_type, lora in (("KLoRASubjectLoader", "KLORA_SUBJECT", "subject"),
                                 ("KLoRAStyleLoader", "KLORA_STYLE", "style")):
        spec = info[node]["input"]
        assert set(spec["required"]) == {"lora_name", "strength"}
        assert set(spec["optional"]) == {"clip", "strength_clip"}
        assert server.names[lora] in _choices(spec["required"]["lora_name"])  # a combo of the loras folder
        assert spec["required"]["strength"][0] == "FLOAT"
        assert spec["optional"]["clip"][0] == "CLIP"
        assert spec["optional"]["strength_clip"][0] == "FLOAT"
        assert info[node]["output"] == [out_type, "CLIP"]

    fuse = info["KLoRAFuse"]["input"]
    req = fuse["required"]
    assert list(req) == ["model", "subject", "style", "pattern", "alpha", "beta", "scope", "outside_scope",
                         "progress_measure"]
    assert [req[k][0] for k in ("model", "subject", "style")] == ["MODEL", "KLORA_SUBJECT", "KLORA_STYLE"]
    assert _choices(req["pattern"]) == ["s", "s*"]
    assert req["alpha"][0] == "FLOAT" and req["alpha"][1]["default"] == 1.5
    assert req["beta"][0] == "FLOAT" and req["beta"][1]["default"] == 0.5  # s's paper value (0.1.0: -1)
    assert _choices(req["scope"]) == ["attention projections", "all shared weights"]
    assert _choices(req["outside_scope"]) == ["both", "subject", "style", "none"]
    assert _choices(req["progress_measure"]) == ["noise level", "step count"]
    assert fuse["optional"]["map_steps"][0] == "INT" and fuse["optional"]["map_steps"][1]["default"] == 20
    assert info["KLoRAFuse"]["output"] == ["MODEL", "STRING", "IMAGE"]


# --------------------------------------------------------------------------- (b)

def test_klora_graph_samples_and_restores_the_base_model(server):
    names = server.names
    before = _latent(server, server.run(_plain(names)))
    # The no-op-variant trick itself: two plain runs with different end_at_step agree.
    assert torch.equal(before, _latent(server, server.run(_plain(names, end_at_step=9998))))

    entry = server.run(_klora(names))
    klora = _latent(server, entry)
    assert torch.isfinite(klora).all()
    assert klora.shape == before.shape == (1, 4, 8, 8)

    report = "\n".join(entry["outputs"]["12"]["text"])
    assert "gamma" in report and "72 tensors matched, 0 unmatched" in report
    first, last = _first_last_subject(report)
    assert first > last, f"the choice should move from subject to style during sampling:\n{report}"
    map_image = entry["outputs"]["12"].get("images")
    assert map_image, "the Fuse node shows its selection map"

    after = _latent(server, server.run(_plain(names, end_at_step=9999)))
    assert torch.equal(before, after), "the plain model changed after a K-LoRA run: base weights were not restored"

    subject_only = _latent(server, server.run(_lora_only(names, names["subject"])))
    style_only = _latent(server, server.run(_lora_only(names, names["style"])))
    both = _latent(server, server.run(_lora_only(names, names["subject"], names["style"])))
    for other, what in ((before, "the plain model"), (subject_only, "the subject LoRA alone"),
                        (style_only, "the style LoRA alone"), (both, "both LoRAs stacked")):
        assert not torch.equal(klora, other), f"K-LoRA output equals {what}"
        assert float((klora - other).abs().max()) > 1e-4, f"K-LoRA output is (nearly) {what}"
    # The stock loader matched every demo LoRA key (the file names fit ComfyUI's key map).
    assert "lora key not loaded" not in server.log_text()
    assert "clip missing" not in server.log_text()


def _first_last_subject(report: str):
    import re

    m = re.search(r"first step (\d+) subject / \d+ style; last step (\d+) subject", report)
    assert m, report
    return int(m.group(1)), int(m.group(2))


# --------------------------------------------------------------------------- (c)

def _fails(server, graph, *needles):
    with pytest.raises(ExecutionFailed) as exc:
        server.run(graph)
    message = str(exc.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in error: {message}"
    assert "\n" not in message
    return message


def test_missing_file_is_a_validation_error(server):
    with pytest.raises(PromptRejected) as exc:
        server.post_prompt(_klora(server.names, subject="missing_subject.safetensors"))
    assert "missing_subject.safetensors" in str(exc.value)
    assert "10" in exc.value.node_errors
    assert exc.value.node_errors["10"]["class_type"] == "KLoRASubjectLoader"


@pytest.mark.parametrize("name, value", [("pattern", "S"), ("scope", "all"), ("outside_scope", "neither"),
                                         ("progress_measure", "steps")])
def test_bad_choice_is_a_validation_error(server, name, value):
    """Refused before anything runs, on every ComfyUI version (0.3.75 does not check V3 combos itself)."""
    with pytest.raises(PromptRejected) as exc:
        server.post_prompt(_klora(server.names, **{name: value}))
    assert exc.value.node_errors["12"]["class_type"] == "KLoRAFuse"
    assert f"{name} must be one of" in str(exc.value) and repr(value) in str(exc.value), str(exc.value)


def test_corrupt_safetensors_names_the_file(server):
    detectable_models.write_corrupt_safetensors(server.loras_dir / "corrupt_style.safetensors")
    message = _fails(server, _klora(server.names, style="corrupt_style.safetensors"),
                     "corrupt_style.safetensors", "KLoRAStyleLoader")
    assert "safetensors" in message


def test_pickle_payload_never_runs(server, tmp_path):
    # The payload is live: an unsafe unpickler would create the marker.
    import pickle

    probe = tmp_path / "probe_marker"
    for handle in pickle.loads(detectable_models.pickle_payload(probe)).values():
        handle.close()
    assert probe.exists()

    marker = tmp_path / "pwned_marker"
    detectable_models.write_pickle_bomb(server.loras_dir / "evil_subject.pt", marker)
    _fails(server, _klora(server.names, subject="evil_subject.pt"), "evil_subject.pt", "KLoRASubjectLoader")
    assert not marker.exists(), "the pickle payload ran inside ComfyUI"


def test_lora_for_another_family_names_file_and_model(server):
    detectable_models.write_flux_lora(server.loras_dir / "flux_style.safetensors")
    _fails(server, _klora(server.names, style="flux_style.safetensors"), "flux_style.safetensors", "SD15",
           "KLoRAFuse")
    detectable_models.write_sd2_shaped_lora(server.loras_dir / "sd2_subject.safetensors")
    _fails(server, _klora(server.names, subject="sd2_subject.safetensors"), "sd2_subject.safetensors",
           "another model")


def test_interrupt_mid_sampling_restores_the_base_model(server):
    names = server.names
    before = _latent(server, server.run(_plain(names)))  # cached result of the first plain run
    graph = _klora(names)
    # About a minute of sampling unless interrupted.  (Not thousands of steps: nodes/sampling_progress.py's
    # ProgressMeter bisects every sigma of the schedule before the first step, ~10 ms per step here.)
    graph["6"]["inputs"]["steps"] = 300
    events = server.open_events()
    assert events is not None
    try:
        prompt_id = server.post_prompt(graph)
        deadline = time.monotonic() + 60
        while True:  # wait until KSampler has made progress: K-LoRA weights are baked now
            event = events.events.get(timeout=max(0.1, deadline - time.monotonic()))
            data = event.get("data") or {}
            if event.get("type") == "progress" and data.get("prompt_id") == prompt_id and str(data.get("node")) == "6" \
                    and data.get("value", 0) >= 2:
                break
        server.interrupt()
        with pytest.raises(ExecutionFailed, match="interrupted"):
            server.wait(prompt_id, timeout=60)
    finally:
        events.close()
    after = _latent(server, server.run(_plain(names, end_at_step=9997)))
    assert torch.equal(before, after), "an interrupted K-LoRA run left patched weights in the base model"


def test_server_keeps_serving_after_errors(server):
    # Runs last in this module (pytest keeps file order): the errors above did not break the server.
    assert server.running()
    latent = _latent(server, server.run(_klora(server.names, alpha=2.0)))
    assert torch.isfinite(latent).all()
    assert math.isfinite(float(latent.abs().sum()))
