"""The names people train with: every family x every naming style its trainers write.

For each family of the matrix (tests/support/family_models.py) and each naming
style its users' trainers write (tests/support/trainer_names.py:
TRAINER_STYLES, e.g. Wan: musubi-tuner ``lora_unet_blocks_0_self_attn_q``,
diffusion-pipe ``diffusion_model.blocks.0.self_attn.q``, diffusers
``transformer.blocks.0.attn1.to_q``), a LoRA generated in that naming by
tests/support/lora_factory.py, whose truth tensors come from the naming
convention (never from the pack):

- loads EVERY tensor through the pack's key map (0 unmatched, the Fuse report
  counts them), onto exactly the truth weights (patched weights = brute-force
  ``W0 + scale * up @ down``, slices included);
- forced subject (alpha 0, beta 0) equals ComfyUI's own loading of the same file
  (``comfy.sd.load_lora_for_models``, what LoraLoaderModelOnly runs) where
  ComfyUI's own key map names every module the way the truth does, else the
  brute-force merge of the truth tensors;
- a subject in one trainer's naming and a style in another's fuse exactly like
  the brute-force per-step reference (tests/support/brute_force.py);
- the command line's and preview route's normalised names (which have no model)
  pair the same layer across namings wherever that is a question of names
  (docs/families.md lists the limits), and their name rule for attention agrees
  with the architecture.
"""
from __future__ import annotations

import pytest
import torch

from support import brute_force
from support import family_models as fm
from support import lora_factory
from support.trainer_names import TRAINER_STYLES

ATOL, RTOL = 2e-5, 1e-4
#: The two namings the family matrix already pairs; every other style is paired with one of them.
GENERIC = ("kohya", "comfy_peft")


def _marks(family):
    return [pytest.mark.slow] if family == "stable_cascade" else []  # its model takes ~2 s to build


def _family_styles():
    return [pytest.param(f, s, marks=_marks(f), id=f"{f}-{s}") for f, styles in TRAINER_STYLES.items()
            for s in styles]


def _mixed_pairs():
    """Each non-generic style once, against kohya or comfy_peft, as subject and as style in turn."""
    for family, styles in TRAINER_STYLES.items():
        new = [s for s in styles if s not in GENERIC] or [GENERIC[1]]
        for i, style in enumerate(new):
            partner = GENERIC[i % 2] if style != GENERIC[0] else GENERIC[1]
            subject, other = (style, partner) if i % 2 == 0 else (partner, style)
            yield pytest.param(family, subject, other, marks=_marks(family), id=f"{family}-{subject}+{other}")


def _model(family):
    reason = fm.available(family)
    if reason:
        pytest.skip(f"{fm.FAMILIES[family].title}: {reason}")
    return fm.build_model(family)


def _handle(tmp_path, role, state_dict, strength=1.0):
    from klora_pack.nodes.handles import make_handle

    path = tmp_path / f"{role}.safetensors"
    lora_factory.save_lora(state_dict, path)
    return make_handle(role, path.name, str(path), strength)


def _units(truth) -> set:
    return {(key, None if offset is None else tuple(offset)) for key, entries in truth.items()
            for _, _, _, offset in entries}


def comfy_names_it_the_same_way(model, names: dict) -> bool:
    """ComfyUI's own key map maps every base name to the weight (and slice) the truth says."""
    import comfy.lora

    stock = comfy.lora.model_lora_keys_unet(model.model, {})
    for base, (key, offset) in names.items():
        target = stock.get(base)
        if target is None:
            return False
        if isinstance(target, str):
            target = (target, None)
        if len(target) > 2 and target[2] is not None:
            return False
        if (target[0], None if target[1] is None else tuple(target[1])) != (key, offset):
            return False
    return True


def _set_weights(model, truth, strength):
    """Brute force: ``W0 + strength * scale * up @ down`` written into ``model``'s weights (float64 sums)."""
    params = dict(model.model.named_parameters())
    with torch.no_grad():
        for key, entries in truth.items():
            p = params[key]
            p.copy_(lora_factory.expected_weight(p, entries, strength).to(p.dtype))
    return model


# ------------------------------------------------------------------ every tensor loads, onto its truth
@pytest.mark.parametrize("family,style", _family_styles())
def test_every_tensor_loads_onto_its_truth(klora_pack, family, style):
    from klora_pack.nodes.comfy_key_map import load_lora_patches

    model = _model(family)
    sd, truth = lora_factory.make_lora(model, style, rank=3, alpha=1.5, scope="all", seed=5)
    assert truth, f"{style} names no weight of {family}"
    parsed = load_lora_patches(sd, model)
    assert (parsed.n_matched, parsed.n_unmatched) == (len(sd), 0), parsed.unmatched_keys[:5]
    got = {(k, None) if isinstance(k, str) else (k[0], tuple(k[1]) if k[1] is not None else None)
           for k in parsed.patches}
    assert got == _units(truth)

    strength = 0.7
    w0 = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    patched = model.clone()
    patched.add_patches(parsed.patches, strength)
    patched.patch_model(device_to=torch.device("cpu"))
    try:
        now = patched.model.state_dict()
        for key, w in w0.items():
            if key in truth:
                want = lora_factory.expected_weight(w, truth[key], strength)
                torch.testing.assert_close(now[key].to(torch.float64), want, rtol=1e-5, atol=1e-6, msg=key)
            else:
                assert torch.equal(now[key], w), f"{key} changed but the {style} file does not target it"
    finally:
        patched.unpatch_model(device_to=torch.device("cpu"))


# ------------------------------------------------------------------ forced subject = ComfyUI / brute force
@pytest.mark.parametrize("family,style", _family_styles())
def test_forced_subject_equals_the_files_own_loading(klora_pack, tmp_path, family, style):
    import comfy.sd
    from klora_pack.nodes.fuse import fuse_model

    model = _model(family)
    sd_s, truth_s = lora_factory.make_lora(model, style, rank=4, alpha=2.0, scope="all", seed=11)
    other = GENERIC[1] if style == GENERIC[0] else GENERIC[0]
    sd_t, _ = lora_factory.make_lora(model, other, rank=2, scope="attn", seed=22, keys=set(truth_s))
    hs, ht = _handle(tmp_path, "subject", sd_s, 0.8), _handle(tmp_path, "style", sd_t, 1.2)
    result = fuse_model(model, hs, ht, alpha=0.0, beta=0.0)
    assert set(result.plan.choose(0.0).values()) == {True}
    stats = result.stats
    assert (stats["subject_matched"], stats["subject_unmatched"]) == (len(sd_s), 0)
    assert (stats["style_matched"], stats["style_unmatched"]) == (len(sd_t), 0)
    assert f"{len(sd_s)} tensors matched, 0 unmatched" in result.report

    names = lora_factory.lora_modules(model, style, "all")
    if comfy_names_it_the_same_way(model, names):
        reference = comfy.sd.load_lora_for_models(model, None, hs.state_dict, hs.strength, 0.0)[0]
    else:
        reference = _set_weights(fm.build_model(family), truth_s, hs.strength)
    torch.testing.assert_close(fm.sample(result.model, family), fm.sample(reference, family), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ subject and style from different trainers
@pytest.mark.parametrize("family,subject_style,style_style", list(_mixed_pairs()))
def test_mixed_naming_pair_equals_brute_force(klora_pack, tmp_path, family, subject_style, style_style):
    import comfy.samplers
    from klora_pack.nodes.fuse import fuse_model

    spec = fm.FAMILIES[family]
    steps, scheduler = spec.steps, "sgm_uniform"
    model = _model(family)
    sd_s, truth_s = lora_factory.make_lora(model, subject_style, rank=4, alpha=2.0, seed=11)
    sd_t, truth_t = lora_factory.make_lora(model, style_style, rank=2, seed=22)
    result = fuse_model(model, _handle(tmp_path, "subject", sd_s), _handle(tmp_path, "style", sd_t))
    assert result.stats["subject_unmatched"] == result.stats["style_unmatched"] == 0
    ours = fm.sample(result.model, family, steps=steps, scheduler=scheduler)
    full = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, full_sigmas=full)
    expected = fm.sample(ref.patcher, family, steps=steps, scheduler=scheduler)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    assert {ref.plan.uses_subject(u, p) for u in ref.plan.ts for p in ref.progress_log} == {True, False}
