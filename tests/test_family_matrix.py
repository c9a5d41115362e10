"""The family matrix: every model family ComfyUI loads LoRAs for, on the ComfyUI version in use.

Each family is its real ComfyUI model class at reduced width (tests/support/family_models.py),
with LoRA files in ComfyUI's own key-map names (kohya ``lora_unet_<path>`` and
``diffusion_model.<path>.lora_A/B``).  For every family:

- the attention projections are the ones the family's architecture has (a list written
  in family_models from the published model code), by the model's structure
  (nodes/attention_structure.py) AND by the name rules (klora_core/weight_keys.py);
- at the default scope Fuse switches exactly those, and nothing else;
- forced subject / forced style equal ComfyUI's own LoRA loading (LoraLoaderModelOnly's
  ``comfy.sd.load_lora_for_models``);
- the default output equals the brute-force per-step reference (support/brute_force.py);
- the selection map groups rows by the family's blocks.

Families the ComfyUI in use lacks (Kandinsky5 before 0.8) are skipped with the reason.
"""
from __future__ import annotations

import pytest
import torch

from support import brute_force
from support import family_models as fm
from support import lora_factory

ATOL, RTOL = 2e-5, 1e-4
SUBJECT_STYLE, STYLE_STYLE = "kohya", "comfy_peft"


def _params():
    return [pytest.param(name, marks=[pytest.mark.slow] if fm.FAMILIES[name].slow else [], id=name)
            for name in fm.NAMES]


@pytest.fixture(params=_params())
def family(request, comfy):
    reason = fm.available(request.param)
    if reason:
        pytest.skip(f"{fm.FAMILIES[request.param].title}: {reason}")
    return request.param


def _handle(tmp_path, role, state_dict, strength=1.0):
    from klora_pack.nodes.handles import make_handle

    path = tmp_path / f"{role}.safetensors"
    lora_factory.save_lora(state_dict, path)
    return make_handle(role, path.name, str(path), strength)


def _pair(tmp_path, model, scope="attn", magnitudes=(0.5, 2.0), strengths=(1.0, 1.0)):
    """Subject (kohya, rank 4, alpha 2) and style (diffusion_model. PEFT, rank 2) handles plus truths."""
    sd_s, truth_s = lora_factory.make_lora(model, SUBJECT_STYLE, rank=4, alpha=2.0, seed=11, scope=scope,
                                           magnitudes=magnitudes)
    sd_t, truth_t = lora_factory.make_lora(model, STYLE_STYLE, rank=2, seed=22, scope=scope, magnitudes=magnitudes)
    return (_handle(tmp_path, "subject", sd_s, strengths[0]), _handle(tmp_path, "style", sd_t, strengths[1]),
            truth_s, truth_t)


def _weight_keys(model) -> set:
    return {k for k, t in model.model.state_dict().items()
            if k.startswith("diffusion_model.") and k.endswith(".weight") and t.ndim >= 2}


def _switched(result) -> set:
    from klora_pack.klora_core.weight_keys import weight_name

    return {weight_name(k) for k in result.plan.keys}


# ------------------------------------------------------------------ which weights are attention
def test_structure_and_names_find_the_architectures_attention_projections(klora_pack, family):
    from klora_pack.klora_core.weight_keys import is_attention_projection
    from klora_pack.nodes.attention_structure import attention_weight_keys

    model = fm.build_model(family)
    expected = set(fm.expected_attention_keys(model, family))
    assert len(expected) == fm.FAMILIES[family].n_attention  # the written list fits this reduced model
    assert attention_weight_keys(model) == expected
    assert {k for k in _weight_keys(model) if is_attention_projection(k)} == expected


def test_cli_names_of_the_lora_files_agree(klora_pack, family):
    """The command line and the preview route see LoRA files, not models: same answer on their names."""
    from klora_pack.klora_core.lora_file import canonical_module_name
    from klora_pack.klora_core.weight_keys import is_attention_name

    model = fm.build_model(family)
    expected = set(fm.expected_attention_keys(model, family))
    for style in (SUBJECT_STYLE, STYLE_STYLE):
        names = lora_factory.lora_modules(model, style, "all")
        wrong = [base for base, (key, _) in names.items()
                 if is_attention_name(canonical_module_name(base)) != (key in expected)]
        assert not wrong, f"{style}: the name rule disagrees with the architecture on {wrong[:5]}"


# ------------------------------------------------------------------ Fuse on each family
def test_default_scope_switches_every_attention_projection_and_nothing_else(klora_pack, tmp_path, family):
    from klora_pack.nodes.fuse import fuse_model

    model = fm.build_model(family)
    hs, ht, truth_s, _ = _pair(tmp_path, model, scope="all")
    result = fuse_model(model, hs, ht)
    expected = set(fm.expected_attention_keys(model, family))
    assert _switched(result) == expected
    assert result.stats["outside"] == len(truth_s) - len(expected)  # every other shared weight is outside
    assert result.stats["subject_unmatched"] == 0 and result.stats["style_unmatched"] == 0
    assert result.stats["unswitched_attention"] == 0 and "WARNING" not in result.report
    assert "recognised from the model's structure" in result.report


@pytest.mark.parametrize("winner", ["subject", "style"])
def test_forced_choice_equals_comfy_lora_loading(klora_pack, tmp_path, family, winner):
    """alpha 0 / beta 0: the subject wins everywhere; beta 10: the style does (checked on the plan)."""
    import comfy.sd
    from klora_pack.nodes.fuse import fuse_model

    model = fm.build_model(family)
    hs, ht, _, _ = _pair(tmp_path, model, magnitudes=(1.0, 1.0), strengths=(0.8, 1.2))
    result = fuse_model(model, hs, ht, alpha=0.0, beta=0.0 if winner == "subject" else 10.0)
    assert set(result.plan.choose(0.0).values()) == {winner == "subject"}
    handle = hs if winner == "subject" else ht
    plain = comfy.sd.load_lora_for_models(model, None, handle.state_dict, handle.strength, 0.0)[0]
    torch.testing.assert_close(fm.sample(result.model, family), fm.sample(plain, family), atol=ATOL, rtol=RTOL)


def test_default_output_equals_brute_force(klora_pack, tmp_path, family):
    import comfy.samplers
    from klora_pack.nodes.fuse import fuse_model

    spec = fm.FAMILIES[family]
    steps, scheduler = spec.steps, "sgm_uniform"
    model = fm.build_model(family)
    hs, ht, truth_s, truth_t = _pair(tmp_path, model)
    result = fuse_model(model, hs, ht)
    ours = fm.sample(result.model, family, steps=steps, scheduler=scheduler)
    full = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, full_sigmas=full)
    expected = fm.sample(ref.patcher, family, steps=steps, scheduler=scheduler)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    assert {ref.plan.uses_subject(u, p) for u in ref.plan.ts for p in ref.progress_log} == {True, False}
    assert result.run.flip_events > 0


def test_selection_map_groups_rows_by_the_familys_blocks(klora_pack, tmp_path, family):
    from klora_pack.klora_core.render import default_group
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.selection_map import display_plan, selection_map_outputs

    model = fm.build_model(family)
    hs, ht, _, _ = _pair(tmp_path, model)
    plan = fuse_model(model, hs, ht).plan
    keys = display_plan(plan).keys
    blocks = [fm.expected_block(family, key) for key in keys]
    assert [default_group(key) for key in keys] == blocks
    runs = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
    assert len(runs) == len(set(runs)) > 1  # each block's rows together, more than one block
    image, _ = selection_map_outputs(plan, 4)
    assert image.shape[0] == 1 and image.shape[-1] == 3
