"""LoRA files of every key style parse, through ComfyUI's own loader, onto the right weights.

Truth comes from tests/lora_factory.py, built from the naming convention of
each style, never from the parser under test. ComfyUI drops unknown names
silently, so every test asserts exact counts.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

FAMILIES = ("sd15", "sdxl", "flux")
STYLES = ("kohya", "kohya_diffusers", "diffusers", "peft", "peft_base")
SCOPES = ("attn", "all")


def _cases():
    for family in FAMILIES:
        for style in STYLES:
            if family == "flux" and style == "kohya_diffusers":
                continue  # not a FLUX naming
            for scope in SCOPES:
                yield pytest.param(family, style, scope, id=f"{family}-{style}-{scope}")


def _split_patch_key(k):
    """(model key, offset or None) of a patch-dict key (str or (key, offset[, fn]))."""
    return (k, None) if isinstance(k, str) else (k[0], k[1])


def _n_modules(truth):
    return sum(len(v) for v in truth.values())


@pytest.mark.parametrize("family,style,scope", list(_cases()))
def test_every_tensor_parses_onto_its_truth(family, style, scope, tiny_model_builder, lora_factory, lora_keys):
    mp = tiny_model_builder(family)
    rank, alpha = 4, (None if style.startswith("peft") else 2.0)
    sd, truth = lora_factory.make_lora(mp, style=style, rank=rank, alpha=alpha, scope=scope, seed=7)
    n_modules = _n_modules(truth)
    assert len(sd) == n_modules * (2 if alpha is None else 3)

    matched, unmatched = lora_keys.count_matched_tensors(sd, lora_keys.build_unet_key_map(mp))
    assert unmatched == [] and matched == set(sd)

    result = lora_keys.load_lora_patches(sd, mp)
    assert (result.n_matched, result.n_unmatched, result.unmatched_keys) == (len(sd), 0, [])
    assert len(result.patches) == n_modules

    seen = set()
    for pkey, adapter in result.patches.items():
        model_key, offset = _split_patch_key(pkey)
        assert model_key in truth, f"{pkey} is not a weight this LoRA targets"
        hits = [e for e in truth[model_key] if e[3] == offset]
        assert len(hits) == 1, f"{pkey}: offset {offset} not in truth {[e[3] for e in truth[model_key]]}"
        up, down, scale, _ = hits[0]
        assert type(adapter).__name__ == "LoRAAdapter"
        w_up, w_down, w_alpha = adapter.weights[:3]
        assert torch.equal(w_up, up) and torch.equal(w_down, down), pkey
        parsed_scale = 1.0 if w_alpha is None else w_alpha / w_down.shape[0]
        assert parsed_scale == pytest.approx(scale), pkey
        seen.add((model_key, offset))
    assert len(seen) == n_modules


def test_counts_are_exact_for_tiny_models(sd15_model, sdxl_model, flux_model, lora_factory):
    """Pin the module counts so a factory that silently generates nothing cannot pass."""
    expect = {  # (attn, all) modules per family, for the kohya style
        "sd15": (sd15_model, 56, 119), "sdxl": (sdxl_model, 32, 85), "flux": (flux_model, 12, 36),
    }
    for family, (mp, n_attn, n_all) in expect.items():
        for scope, n in (("attn", n_attn), ("all", n_all)):
            _, truth = lora_factory.make_lora(mp, style="kohya", scope=scope)
            assert _n_modules(truth) == n, (family, scope)
    # FLUX diffusers names split the fused qkv/linear1 weights: 2 double blocks x
    # (3 img + 3 txt + 2 proj) + 2 single blocks x (3 qkv + proj_mlp + proj_out).
    _, truth = lora_factory.make_lora(flux_model, style="diffusers", scope="attn")
    assert _n_modules(truth) == 2 * 8 + 2 * 5


def test_hand_checked_name_correspondence(sd15_model, sdxl_model, flux_model, lora_factory):
    """A few names worked out by hand from the diffusers and ldm layouts."""
    mods = lora_factory.lora_modules(sd15_model, "diffusers", "attn")
    # SD1.5 tiny: 1 res block per level, so level 1's first block is input_blocks.3
    assert mods["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight", None)
    assert mods["unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0"] == (
        "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.weight", None)
    mods = lora_factory.lora_modules(sdxl_model, "peft_base", "all")
    assert mods["base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"] == (
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", None)
    assert mods["base_model.model.add_embedding.linear_1"] == ("diffusion_model.label_emb.0.0.weight", None)
    assert mods["base_model.model.down_blocks.0.resnets.0.conv1"] == (
        "diffusion_model.input_blocks.1.0.in_layers.2.weight", None)
    mods = lora_factory.lora_modules(flux_model, "diffusers", "all")
    assert mods["transformer.transformer_blocks.1.attn.add_v_proj"] == (
        "diffusion_model.double_blocks.1.txt_attn.qkv.weight", (0, 128, 64))
    assert mods["transformer.single_transformer_blocks.1.proj_mlp"] == (
        "diffusion_model.single_blocks.1.linear1.weight", (0, 192, 256))
    assert mods["transformer.single_transformer_blocks.0.proj_out"] == (
        "diffusion_model.single_blocks.0.linear2.weight", None)
    mods = lora_factory.lora_modules(flux_model, "kohya", "attn")
    assert mods["lora_unet_double_blocks_0_img_attn_qkv"] == (
        "diffusion_model.double_blocks.0.img_attn.qkv.weight", None)


def test_flux_table_agrees_with_comfy_flux_to_diffusers(flux_model, lora_factory):
    import comfy.utils

    ref = comfy.utils.flux_to_diffusers(flux_model.model.model_config.unet_config, output_prefix="diffusion_model.")
    mods = lora_factory.lora_modules(flux_model, "peft", "all")
    assert mods
    for name, (key, offset) in mods.items():
        target = ref[name + ".weight"]
        expected = (target, None) if isinstance(target, str) else tuple(target)
        assert expected == (key, offset), name


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_comfy_map_misses_peft_names(family, tiny_model_builder, lora_factory, lora_keys):
    """Documents the gap: ComfyUI 0.3.75's own key map loads none of these tensors."""
    import comfy.lora

    mp = tiny_model_builder(family)
    stock = comfy.lora.model_lora_keys_unet(mp.model, {})
    styles = ("peft", "peft_base") if family == "flux" else ("diffusers", "peft", "peft_base")
    for style in styles:
        sd, truth = lora_factory.make_lora(mp, style=style, scope="attn")
        assert comfy.lora.load_lora(sd, stock, log_missing=False) == {}, style
        _, unmatched = lora_keys.count_matched_tensors(sd, stock)
        assert len(unmatched) == len(sd), style
        assert len(lora_keys.load_lora_patches(sd, mp).patches) == _n_modules(truth), style


@pytest.mark.parametrize("family,style", [("sd15", "peft"), ("sdxl", "diffusers"), ("flux", "diffusers")])
def test_patch_model_matches_brute_force(family, style, tiny_model_builder, lora_factory, lora_keys):
    mp = tiny_model_builder(family)
    sd, truth = lora_factory.make_lora(mp, style=style, rank=3, alpha=1.5, scope="all", seed=3)
    lora_factory.check_patched_weights(mp, lora_keys.load_lora_patches(sd, mp).patches, truth, strength=0.7)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_with_parsed_lora(family, tiny_model_builder, lora_factory, lora_keys):
    """Tiny models sample finitely, deterministically, and the parsed LoRA changes the result."""
    from support import tiny_models

    mp = tiny_model_builder(family)
    base = tiny_models.sample_once(mp, family)
    assert base.shape == (1, tiny_models.LATENT_CHANNELS[family], 8, 8)
    assert torch.isfinite(base).all()
    assert torch.equal(base, tiny_models.sample_once(mp, family))
    sd, _ = lora_factory.make_lora(mp, style="peft", scope="attn", scale=5.0)
    patched = mp.clone()
    patched.add_patches(lora_keys.load_lora_patches(sd, mp).patches, 1.0)
    out = tiny_models.sample_once(patched, family)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, base)
    assert torch.equal(tiny_models.sample_once(mp, family), base), "base model not restored after sampling"


def test_unmatched_tensors_are_counted_and_summarised(sd15_model, lora_factory, lora_keys, caplog):
    sd, truth = lora_factory.make_lora(sd15_model, style="peft", scope="attn")
    sd["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(4, 8)
    sd["unet.no_such_block.to_q.lora_B.weight"] = torch.zeros(8, 4)
    sd["text_encoder.foo.lora_A.weight"] = torch.zeros(4, 8)
    with caplog.at_level("DEBUG"):
        result = lora_keys.load_lora_patches(sd, sd15_model)
    assert result.n_unmatched == 3 and result.n_matched == len(sd) - 3
    assert result.unmatched_keys == sorted(k for k in sd if "no_such" in k or "foo" in k)
    assert len(result.patches) == _n_modules(truth)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    ours = [r for r in caplog.records if r.name == "klora.lora_keys" and r.levelname == "WARNING"]
    assert len(ours) == 1 and "3 of" in ours[0].getMessage()


def test_count_matched_tensors_suffix_forms(lora_keys):
    key_map = {"a.b": "diffusion_model.a.b.weight", "lora_unet_x": "diffusion_model.x.weight"}
    names = [f"a.b{s}" for s in lora_keys.LORA_TENSOR_SUFFIXES] + [
        "lora_unet_x.lora_up.weight", "lora_unet_x.alpha", "lora_unet_x.hada_w1_a",
        "a.c.lora_A.weight", "a.b.lora_C.weight", "lora_unet_y.lora_up.weight", "a.b",
    ]
    matched, unmatched = lora_keys.count_matched_tensors(dict.fromkeys(names), key_map)
    assert unmatched == sorted(["a.c.lora_A.weight", "a.b.lora_C.weight", "lora_unet_y.lora_up.weight", "a.b"])
    assert matched == set(names) - set(unmatched)
    for form in (".lora_up.weight", ".lora_down.weight", ".alpha", ".lora.up.weight", "_lora.up.weight",
                 ".lora_A.weight", ".lora_B.weight", ".lora_mid.weight", ".dora_scale", ".hada_w1_a",
                 ".lokr_w1", ".diff", ".diff_b"):
        assert form in lora_keys.LORA_TENSOR_SUFFIXES, form


def test_suffix_list_covers_the_comfy_source_in_use(comfy, lora_keys):
    """Every '"{}<suffix>".format(x)' name ComfyUI's loader reads is in LORA_TENSOR_SUFFIXES."""
    files = [comfy / "comfy" / "lora.py"] + sorted((comfy / "comfy" / "weight_adapter").glob("*.py"))
    found = set()
    for f in files:
        found |= set(re.findall(r'"\{\}([._][A-Za-z0-9_.]+)"\.format\(x\)', f.read_text()))
    assert ".lora_up.weight" in found and ".hada_w1_a" in found  # the scan itself works
    assert found - set(lora_keys.LORA_TENSOR_SUFFIXES) == set()


def test_clip_names_join_the_key_map(sd15_model, lora_keys):
    """With a clip, text-encoder names (ComfyUI's own map) are matched too."""
    te_key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    fake_clip = SimpleNamespace(cond_stage_model=SimpleNamespace(state_dict=lambda: {te_key: torch.zeros(8, 8)}))
    sd = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, 2),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 8)}
    assert lora_keys.load_lora_patches(sd, sd15_model).n_unmatched == 2
    result = lora_keys.load_lora_patches(sd, sd15_model, clip=fake_clip)
    assert (result.n_matched, result.n_unmatched) == (2, 0)
    assert list(result.patches) == [te_key]


def test_save_lora_round_trip(sdxl_model, lora_factory, tmp_loras_dir):
    import comfy.utils

    sd, _ = lora_factory.make_lora(sdxl_model, style="kohya", alpha=4.0, dtype=torch.float16)
    path = tmp_loras_dir / "subject.safetensors"
    lora_factory.save_lora(sd, path)
    back = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == torch.float16 for k in sd)


def test_factory_is_seeded_and_independent_of_key_order(sd15_model, lora_factory):
    a, _ = lora_factory.make_lora(sd15_model, style="peft", seed=1)
    b, _ = lora_factory.make_lora(sd15_model, style="peft", seed=1)
    c, _ = lora_factory.make_lora(sd15_model, style="peft", seed=2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # Same seed, other naming: same draws in sorted-module order only when names sort alike,
    # so just check the scale multiplier acts on up tensors alone.
    d, _ = lora_factory.make_lora(sd15_model, style="peft", seed=1, scale=3.0)
    for k in a:
        torch.testing.assert_close(d[k], a[k] * (3.0 if ".lora_B." in k else 1.0))
