# SPDX-License-Identifier: GPL-3.0-or-later
"""Bake, bypass and live through a REAL ComfyUI server: the same latents to float32 precision.

One server (tests/support/server_harness.py) with the pack and a test-only
node (tests/support/tiny_model_node.py) that builds the tests' tiny seeded
models, their conditioning and an empty latent; LoRA files from the LoRA
factory in the server's loras folder.  Per case the graph
``KLoRATestTinyModel -> Load Subject/Style LoRA -> K-LoRA Fuse(mode) ->
KSamplerAdvanced -> SaveLatent`` runs once per mode:

- bypass vs bake and live vs bake: relative (Frobenius) error <= 1e-5, float32, and <= 1e-3 of what
  the LoRAs change in the latent (the K-LoRA latent differs clearly from the plain model's);
- the report names the mode; a plain run afterwards is bit-identical to one before;
- a forced bypass with a dense patch fails with one message, and the base model is unchanged.

Cases: SD1.5 kohya names, SD1.5 diffusers + PEFT names, FLUX fused qkv from a
kohya file against diffusers slices (row offsets), kohya conv LoRAs on every
SD1.5 weight (scope 'all shared weights').
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from support import lora_factory
from support import tiny_models
from support.server_harness import ComfyServer, ExecutionFailed

pytestmark = [pytest.mark.server, pytest.mark.slow]

TINY_MODEL_NODE = Path(__file__).resolve().parent / "support" / "tiny_model_node.py"
STEPS = 6
SEED = 3
MAX_RELATIVE = 1e-5
#: The same differences relative to what the LoRAs change (the latents are large: a random tiny model).
MAX_RELATIVE_TO_EFFECT = 1e-3
#: Up factors x this, so the LoRAs move the latent clearly above float32 noise.
LORA_SCALE = 4.0
#: id -> (family, subject key style, style key style, LoRA scope, fuse scope)
CASES = {
    "sd15-kohya": ("sd15", "kohya", "kohya_diffusers", "attn", "attention projections"),
    "sd15-diffusers+peft": ("sd15", "diffusers", "peft", "attn", "attention projections"),
    "flux-qkv-offsets": ("flux", "kohya", "diffusers", "attn", "attention projections"),
    "sd15-conv-all": ("sd15", "kohya", "kohya", "all", "all shared weights"),
}


@pytest.fixture(scope="module")
def server(comfy):
    s = ComfyServer()
    os.symlink(TINY_MODEL_NODE, s.workdir / "custom_nodes" / "klora_test_tiny_model.py")
    for n, (case, (family, s_style, t_style, lora_scope, _)) in enumerate(CASES.items()):
        model = tiny_models.build_model(family, seed=0)
        for role, style, rank, seed in (("subject", s_style, 4, 11 + n), ("style", t_style, 3, 22 + n)):
            sd, _ = lora_factory.make_lora(model, style, rank=rank, alpha=2.0, seed=seed, scope=lora_scope,
                                           scale=LORA_SCALE)
            lora_factory.save_lora(sd, s.loras_dir / f"{case}-{role}.safetensors")
    with s:
        yield s


def _graph(family, model_ref, extra_nodes=None, prefix="t", end_at_step=10000):
    g = {
        "1": {"class_type": "KLoRATestTinyModel", "inputs": {"family": family, "seed": 0}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model_ref, "add_noise": "enable", "noise_seed": SEED, "steps": STEPS,
            "cfg": 1.0 if family == "flux" else 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["1", 3], "start_at_step": 0,
            "end_at_step": end_at_step, "return_with_leftover_noise": "disable"}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    g.update(extra_nodes or {})
    return g


def _klora(case, mode, subject=None, style=None):
    family, *_, scope = CASES[case]
    nodes = {
        "10": {"class_type": "KLoRASubjectLoader",
               "inputs": {"lora_name": subject or f"{case}-subject.safetensors", "strength": 1.0}},
        "11": {"class_type": "KLoRAStyleLoader",
               "inputs": {"lora_name": style or f"{case}-style.safetensors", "strength": 0.9}},
        "12": {"class_type": "KLoRAFuse", "inputs": {
            "model": ["1", 0], "subject": ["10", 0], "style": ["11", 0], "pattern": "s", "alpha": 1.5,
            "beta": -1.0, "scope": scope, "outside_scope": "both", "progress_measure": "noise level",
            "map_steps": STEPS, "mode": mode}},
    }
    return _graph(family, ["12", 0], nodes, prefix=f"{case}-{mode}")


def _latent(server, entry):
    from safetensors.torch import load_file

    return load_file(str(server.output_file(entry, "7", "latents")))["latent_tensor"]


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", list(CASES))
def test_bypass_and_live_equal_bake(server, case):
    family = CASES[case][0]
    # end_at_step >= steps changes nothing but the cache signature: a real re-run on the same cached model.
    before = _latent(server, server.run(_graph(family, ["1", 0], prefix=f"{case}-plain", end_at_step=1000 + STEPS)))
    latents = {}
    for mode in ("bake", "bypass", "live"):
        entry = server.run(_klora(case, mode))
        report = "\n".join(entry["outputs"]["12"]["text"])
        assert f"mode {mode}: " in report and "(chosen by the mode input)" in report, report
        latents[mode] = _latent(server, entry)
        assert torch.isfinite(latents[mode]).all() and latents[mode].dtype == torch.float32
    effect = float((latents["bake"] - before).norm())
    assert effect / float(before.norm()) > 2e-4, "the LoRAs changed nearly nothing"
    for mode in ("bypass", "live"):
        assert _relative(latents[mode], latents["bake"]) <= MAX_RELATIVE, mode
        assert float((latents[mode] - latents["bake"]).norm()) / effect <= MAX_RELATIVE_TO_EFFECT, mode
    entry = server.run(_klora(case, "auto"))
    report = "\n".join(entry["outputs"]["12"]["text"])
    assert "mode bake: " in report and "(auto: ComfyUI's classic patcher" in report, report
    after = _latent(server, server.run(_graph(family, ["1", 0], prefix=f"{case}-plain2", end_at_step=2000 + STEPS)))
    assert torch.equal(before, after), "the plain model changed after the K-LoRA runs"


def test_forced_bypass_with_a_dense_patch_fails_cleanly(server):
    model = tiny_models.build_model("sd15", seed=0)
    sd_model = model.model.state_dict()
    gen = torch.Generator().manual_seed(5)
    dense = {base + ".diff": torch.randn(sd_model[key].shape, generator=gen) * 0.02
             for base, (key, _) in lora_factory.lora_modules(model, "kohya", "attn").items()}
    lora_factory.save_lora(dense, server.loras_dir / "dense-style.safetensors")
    before = _latent(server, server.run(_graph("sd15", ["1", 0], prefix="dense-plain", end_at_step=3000)))
    with pytest.raises(ExecutionFailed) as info:
        server.run(_klora("sd15-kohya", "bypass", style="dense-style.safetensors"))
    message = str(info.value)
    assert "mode 'bypass'" in message and "dense-style.safetensors" in message and "dense 'diff' patch" in message
    assert "\n" not in message
    bake = _latent(server, server.run(_klora("sd15-kohya", "bake", style="dense-style.safetensors")))
    assert not torch.equal(bake, before)
    after = _latent(server, server.run(_graph("sd15", ["1", 0], prefix="dense-plain2", end_at_step=3001)))
    assert torch.equal(before, after)
