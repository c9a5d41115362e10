"""klora_core.cli.demo_models against the ComfyUI it targets (in-process; the server tests load the files for real).

The generators import no ComfyUI; these checks tie their hand-written layouts
to ComfyUI's own model classes, detection and LoRA key map, so a layout slip
fails here with a readable diff instead of as a server-side loader error.
"""
from __future__ import annotations

import time

import pytest
import torch

from klora_core.cli import demo_models
from klora_core.lora_file import lora_modules
from klora_core.plan import build_plan


@pytest.fixture(scope="module")
def unet_sd():
    return demo_models.make_unet_state_dict(demo_models.DEFAULT_SEED)


def _shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_unet_is_detected_as_sd15_with_comfys_exact_layout(comfy, unet_sd):
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet(unet_sd, "")
    assert type(config).__name__ == "SD15"
    for key, value in demo_models.UNET_CONFIG.items():
        assert config.unet_config[key] == value, key
    model = config.get_model(unet_sd, "", device=torch.device("cpu"))
    assert _shapes(model.diffusion_model.state_dict()) == _shapes(unet_sd)
    assert all(v.dtype == torch.float16 for v in unet_sd.values())


def test_text_encoder_and_vae_have_comfys_exact_layout(comfy):
    import comfy.sd1_clip
    import comfy.taesd.taesd

    clip = demo_models.make_clip_l_state_dict(1)
    ref = {k[len("clip_l.transformer."):]: v for k, v in comfy.sd1_clip.SD1ClipModel(device="cpu").state_dict().items()
           if k.startswith("clip_l.transformer.")}
    assert _shapes(ref) == _shapes(clip)
    vae = demo_models.make_taesd_state_dict(1)
    assert _shapes(comfy.taesd.taesd.TAESD().state_dict()) == _shapes(vae)


def test_lora_names_follow_comfys_key_map(comfy, unet_sd):
    import comfy.lora
    import comfy.model_detection

    model = comfy.model_detection.model_config_from_unet(unet_sd, "").get_model(unet_sd, "")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    subject, style = demo_models.make_lora_pair()
    targets = demo_models.attention_targets()
    assert len(targets) == 24
    for kohya, weight_key, out_f, in_f in targets:
        assert key_map.get(kohya) == weight_key, kohya
        assert tuple(model.state_dict()[weight_key].shape) == (out_f, in_f)
        assert tuple(subject[kohya + ".lora_down.weight"].shape) == (demo_models.SUBJECT_RANK, in_f)
        assert tuple(style[kohya + ".lora_up.weight"].shape) == (out_f, demo_models.STYLE_RANK)
    assert len(subject) == len(style) == 3 * len(targets)


@pytest.mark.parametrize("steps", [4, 20])
def test_demo_pair_flips_from_subject_to_style(steps):
    subject, style = demo_models.make_lora_pair()
    plan = build_plan(lora_modules(subject), lora_modules(style), 1.5, 0.5, "s")
    selection = plan.selection(steps)
    first = sum(v[0] for v in selection.values())
    last = sum(v[-1] for v in selection.values())
    assert first >= 0.75 * len(selection) and last <= 0.25 * len(selection), (first, last)
    flip_steps = {v.index(False) for v in selection.values() if v[0] and not v[-1]}
    assert len(flip_steps) >= 2, "weights should flip at different steps"


def test_generation_is_seeded_and_fast(tmp_path):
    t0 = time.perf_counter()
    a = demo_models.make_unet_state_dict(3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"UNet generation took {elapsed:.1f} s"
    b = demo_models.make_unet_state_dict(3)
    c = demo_models.make_unet_state_dict(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["out.2.weight"], c["out.2.weight"])
    s1, t1 = demo_models.make_lora_pair(5)
    s2, _ = demo_models.make_lora_pair(5)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    path = demo_models.ensure_file("subject", tmp_path, 5)
    assert path.name == demo_models.file_name("subject", 5) and path.stat().st_size > 0
    mtime = path.stat().st_mtime_ns
    assert demo_models.ensure_file("subject", tmp_path, 5).stat().st_mtime_ns == mtime  # reused, not rewritten
    assert not list(tmp_path.glob(".tmp-*"))
