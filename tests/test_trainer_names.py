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

    lora_factory.check_patched_weights(model.clone(), parsed.patches, truth, strength=0.7)


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
    from klora_pack.nodes.fuse import fuse_model

    spec = fm.FAMILIES[family]
    steps, scheduler = spec.steps, "sgm_uniform"
    model = _model(family)
    sd_s, truth_s = lora_factory.make_lora(model, subject_style, rank=4, alpha=2.0, seed=11)
    sd_t, truth_t = lora_factory.make_lora(model, style_style, rank=2, seed=22)
    result = fuse_model(model, _handle(tmp_path, "subject", sd_s), _handle(tmp_path, "style", sd_t))
    assert result.stats["subject_unmatched"] == result.stats["style_unmatched"] == 0
    ours = fm.sample(result.model, family, steps=steps, scheduler=scheduler)
    expected, ref = brute_force.sample_reference(model, family, truth_s, truth_t, steps, scheduler)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    assert {ref.plan.uses_subject(u, p) for u in ref.plan.ts for p in ref.progress_log} == {True, False}


# ------------------------------------------------------------------ the command line's names (no model)
#: Styles written in ComfyUI's module layout; every other style names the family's diffusers port.
COMFY_LAYOUT = ("kohya", "comfy_peft", "kohya_prior", "diffusion_pipe")
#: Families whose diffusers-port files cannot pair by name with files in ComfyUI's layout
#: (docs/families.md); inside ComfyUI the Fuse node pairs them by weight.
CROSS_LAYOUT_LIMITS = {
    **dict.fromkeys(("sd35", "flux", "chroma", "hunyuan_video", "pixart", "lumina2", "z_image"),
                    "the diffusers port splits weights ComfyUI keeps fused (q/k/v in one qkv)"),
    "auraflow": "its diffusers single blocks are named like FLUX's (single_transformer_blocks.N.attn.to_q)",
}
SPLIT_PORTS = tuple(f for f, why in CROSS_LAYOUT_LIMITS.items() if "fused" in why)
#: Same layer, a name that cannot be told apart without the model: Wan's and Cosmos Predict2's output
#: layers are ``proj_out`` in diffusers, a name other families give to other layers; Lumina 2's and
#: Cosmos Predict2's ports both name their final modulation ``norm_out.linear_1/2`` (other layers).
_WAN_HEAD = {"diffusion_model.head.head.weight"}
_LUMINA_FINAL = {"diffusion_model.final_layer.adaLN_modulation.1.weight", "diffusion_model.final_layer.linear.weight"}
NOT_BY_NAME = {"wan21_t2v": _WAN_HEAD, "wan21_i2v": _WAN_HEAD, "wan22": _WAN_HEAD,
               "lumina2": _LUMINA_FINAL, "z_image": _LUMINA_FINAL,
               "cosmos_predict2": {"diffusion_model.final_layer.linear.weight",
                                   "diffusion_model.final_layer.adaln_modulation.1.weight",
                                   "diffusion_model.final_layer.adaln_modulation.2.weight"}}
#: SD1.5/SDXL pairing of LDM and diffusers names assumes two res blocks per UNet level, which the
#: tiny test UNets do not have (klora_core/lora_file.py and its tests cover full-size names).
UNET_FAMILIES = ("sd15", "sdxl")


def _style_pairs():
    for family, styles in TRAINER_STYLES.items():
        if family in UNET_FAMILIES:
            continue
        for i, a in enumerate(styles):
            for b in styles[i + 1:]:
                cross = (a in COMFY_LAYOUT) != (b in COMFY_LAYOUT)
                if cross and family in CROSS_LAYOUT_LIMITS:
                    continue
                yield pytest.param(family, a, b, marks=_marks(family), id=f"{family}-{a}-{b}")


@pytest.mark.parametrize("family,style_a,style_b", list(_style_pairs()))
def test_cli_pairs_the_same_layer_across_namings(klora_pack, family, style_a, style_b):
    """Two files naming the same weight (and slice) get the same normalised name, so the CLI pairs them."""
    from klora_pack.klora_core.lora_file import canonical_module_name

    model = _model(family)
    by_target = []
    for style in (style_a, style_b):
        names = lora_factory.lora_modules(model, style, "all")
        by_target.append({target: base for base, target in names.items()
                          if target[0] not in NOT_BY_NAME.get(family, ())})
    common = set(by_target[0]) & set(by_target[1])
    assert common
    unpaired = [(by_target[0][t], by_target[1][t]) for t in sorted(common, key=str)
                if canonical_module_name(by_target[0][t]) != canonical_module_name(by_target[1][t])]
    assert not unpaired, unpaired[:4]


@pytest.mark.parametrize("family", SPLIT_PORTS)
def test_split_ports_really_split_fused_weights(klora_pack, family):
    """The documented limit is a layout, not a name: the diffusers port names slices of fused weights."""
    model = _model(family)
    port = next(s for s in TRAINER_STYLES[family] if s not in COMFY_LAYOUT)
    sliced = [t for t in lora_factory.lora_modules(model, port, "attn").values() if t[1] is not None]
    assert sliced, f"{family} {port}: no slice of a fused weight"


@pytest.mark.parametrize("family,style", _family_styles())
def test_name_rule_agrees_with_the_architecture_in_every_naming(klora_pack, family, style):
    """The CLI's attention rule (on normalised names) says what the family's architecture says."""
    from klora_pack.klora_core.lora_file import canonical_module_name
    from klora_pack.klora_core.weight_keys import is_attention_name

    model = _model(family)
    expected = set(fm.expected_attention_keys(model, family))
    names = lora_factory.lora_modules(model, style, "all")
    normalised = [canonical_module_name(base) for base in names]
    assert len(set(normalised)) == len(normalised), "two modules of one file normalise to one name"
    wrong = [base for base, (key, _) in names.items() if is_attention_name(canonical_module_name(base)) != (key in expected)]
    assert not wrong, wrong[:5]


# ------------------------------------------------------------------ what ComfyUI alone does with these files
#: Namings ComfyUI itself maps to nothing (0.3.75 and 0.8.0): LoraLoader silently patches nothing.
COMFY_LOADS_NONE = [("wan21_t2v", "diffusers"), ("wan21_i2v", "diffusers"), ("hunyuan_video", "diffusers"),
                    ("ltxv", "diffusers"), ("z_image", "kohya_diffusers"), ("lumina2", "diffusers"),
                    ("cosmos_predict2", "diffusers")]


@pytest.mark.parametrize("family,style", COMFY_LOADS_NONE, ids=[f"{f}-{s}" for f, s in COMFY_LOADS_NONE])
def test_namings_comfy_maps_to_nothing_load_fully_here(klora_pack, family, style):
    import comfy.lora
    from klora_pack.nodes.comfy_key_map import load_lora_patches

    model = _model(family)
    sd, truth = lora_factory.make_lora(model, style, scope="attn")
    stock = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    assert stock == {}, f"ComfyUI now maps {len(stock)} {style} modules of {family}: update docs/families.md"
    parsed = load_lora_patches(sd, model)
    assert (parsed.n_matched, parsed.n_unmatched, len(parsed.patches)) == (len(sd), 0, len(_units(truth)))


def test_lumina2_grouped_query_kv_take_the_models_widths(klora_pack):
    """Lumina 2 has 2 query heads and 1 k/v head here: k and v are half as wide as q inside ``qkv``."""
    import comfy.lora
    from klora_pack.nodes.comfy_key_map import build_unet_key_map

    model = _model("lumina2")
    qkv = "diffusion_model.layers.0.attention.qkv.weight"
    assert tuple(model.model.state_dict()[qkv].shape) == (128, 64)  # q 64 + k 32 + v 32 rows
    ours = build_unet_key_map(model)
    for name in ("diffusion_model.layers.0.attention.to_k", "transformer.layers.0.attn.to_k"):
        assert ours[name] == (qkv, (0, 64, 32)), name
    assert ours["diffusion_model.layers.0.attention.to_v"] == (qkv, (0, 96, 32))
    stock = comfy.lora.model_lora_keys_unet(model.model, {}).get("diffusion_model.layers.0.attention.to_k")
    if stock is not None and tuple(stock[1]) == (0, 64, 32):
        pytest.skip("this ComfyUI maps Lumina 2's grouped-query k itself")
    # ComfyUI's own entry (where it has one) assumes k as wide as q: rows 64..128, the v rows included.
    assert stock is None or tuple(stock[1]) == (0, 64, 64)


def test_a_k_delta_as_wide_as_q_on_grouped_query_lumina2_names_the_real_reason(klora_pack, tmp_path):
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.fuse import fuse_model

    model = _model("lumina2")
    sd_s, _ = lora_factory.make_lora(model, "zimage_names", scope="attn", seed=1)
    sd_s["diffusion_model.layers.0.attention.to_k.lora_B.weight"] = torch.zeros(64, 4)  # q's width, not k's 32
    sd_t, _ = lora_factory.make_lora(model, "kohya", scope="attn", seed=2)
    with pytest.raises(KLoRAError) as err:
        fuse_model(model, _handle(tmp_path, "subject", sd_s), _handle(tmp_path, "style", sd_t))
    message = str(err.value)
    assert "layers.0.attention.qkv.weight[0:64:+32]" in message and "delta 64x64" in message, message
    assert "rows 64..96 (32x64) of the model weight of shape (128, 64)" in message, message


def test_report_counts_unmatched_tensors_of_any_naming(klora_pack, tmp_path):
    from klora_pack.nodes.fuse import fuse_model

    model = _model("wan21_t2v")
    sd_s, _ = lora_factory.make_lora(model, "diffusers", scope="attn", seed=1)
    sd_s["transformer.blocks.9.attn1.to_q.lora_A.weight"] = torch.zeros(4, 64)  # no block 9 here
    sd_s["transformer.blocks.0.attn1.to_q.lora_B.bias"] = torch.zeros(64)  # not a tensor ComfyUI reads
    sd_t, _ = lora_factory.make_lora(model, "kohya", scope="attn", seed=2, alpha=2.0)
    result = fuse_model(model, _handle(tmp_path, "subject", sd_s), _handle(tmp_path, "style", sd_t))
    assert (result.stats["subject_matched"], result.stats["subject_unmatched"]) == (len(sd_s) - 2, 2)
    assert (result.stats["style_matched"], result.stats["style_unmatched"]) == (len(sd_t), 0)
    assert f"{len(sd_s) - 2} tensors matched, 2 unmatched" in result.report


@pytest.mark.parametrize("family,style_a,style_b", [("wan21_i2v", "kohya", "diffusers"),
                                                    ("lumina2", "diffusers", "zimage_names"),
                                                    ("hunyuan_video", "kohya", "diffusion_pipe")])
def test_cli_reads_a_pair_from_two_trainers_as_one_set_of_layers(klora_pack, family, style_a, style_b):
    """What ``python -m klora_core inspect`` and /klora/preview read: every attention layer of both files is shared."""
    from klora_pack.klora_core.lora_file import lora_modules
    from klora_pack.klora_core.weight_keys import is_attention_name

    model = _model(family)
    sd_a, truth_a = lora_factory.make_lora(model, style_a, seed=1)
    sd_b, truth_b = lora_factory.make_lora(model, style_b, seed=2, keys=set(truth_a))
    modules_a, modules_b = lora_modules(sd_a, source=style_a), lora_modules(sd_b, source=style_b)
    shared = set(modules_a) & set(modules_b)
    assert shared == set(modules_b) and all(is_attention_name(name) for name in shared)
    assert len(shared) == len(_units(truth_b))
