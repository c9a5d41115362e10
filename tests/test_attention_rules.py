"""The two attention rules in detail, and what the report says about weights K-LoRA leaves unswitched.

The family matrix (test_family_matrix.py) holds the structural rule and the name
rules to each family's architecture; this file checks the rules' edges (the
fallback, the FLUX single-stream special case, names that must NOT count) and
issue 10 item 4: nothing is mixed silently.
"""
from __future__ import annotations

import types

import pytest
import torch

from klora_core.weight_keys import block_of, is_attention_name, is_attention_projection
from support import family_models as fm
from support import lora_factory

# (name, is an attention projection): written from each family's model code.
NAMES = [
    ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight", True),
    ("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", True),  # CLI canonical (diffusers SD)
    ("diffusion_model.layers.0.attention.out.weight", True),  # Lumina2 / Z-Image
    ("diffusion_model.noise_refiner.0.attention.qkv.weight", True),
    ("diffusion_model.blocks.0.cross_attn.k_img.weight", True),  # Wan I2V
    ("diffusion_model.double_stream_blocks.0.block.attn1.to_out_t.weight", True),  # HiDream text stream
    ("diffusion_model.blocks.0.self_attn.output_proj.weight", True),  # Cosmos Predict2
    ("diffusion_model.blocks.0.cross_attn.kv_linear.weight", True),  # PixArt
    ("diffusion_model.double_layers.0.attn.w2o.weight", True),  # AuraFlow
    ("diffusion_model.visual_transformer_blocks.0.cross_attention.to_query.weight", True),  # Kandinsky5
    ("diffusion_model.down_blocks.0.1.attention.attn.out_proj.weight", True),  # Stable Cascade
    ("diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv.weight", True),  # HunyuanVideo
    ("txt_in_individual_token_refiner_blocks_0_self_attn_qkv", True),  # diffusion-pipe spelling, canonical
    ("diffusion_model.blocks.0.attn.qkv_y.weight", True),  # Mochi (not in the matrix)
    ("diffusion_model.single_blocks.3.linear1.weight", True),  # FLUX single stream (fused with the MLP)
    ("single_transformer_blocks_3_proj_mlp", True),  # its diffusers slice names
    ("single_transformer_blocks_3_proj_out", True),
    ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias", False),
    ("diffusion_model.layers.0.attention_norm1.weight", False),
    ("diffusion_model.blocks.0.cross_attn.norm_k_img.weight", False),
    ("diffusion_model.blocks.0.ffn.0.weight", False),
    ("diffusion_model.double_blocks.0.img_mlp.0.weight", False),
    ("diffusion_model.double_blocks.0.img_mod.lin.weight", False),
    ("down_blocks_0_attentions_0_proj_out", False),  # the spatial transformer's output, not attention
    ("diffusion_model.down_blocks.0.1.kv_mapper.1.weight", False),
    ("te1_text_model_encoder_layers_0_self_attn_q_proj", False),  # text encoders are never switched
]


@pytest.mark.parametrize("name,expected", NAMES)
def test_name_rule(name, expected):
    assert is_attention_name(name) is expected
    if name.startswith("diffusion_model."):
        assert is_attention_projection(name) is expected
        assert is_attention_projection((name, (0, 0, 4))) is expected  # a slice unit of the weight


BLOCKS = [
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.4"),
    ("diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight", "middle_block"),
    ("mid_block_attentions_0_transformer_blocks_0_attn1_to_q", "mid_block"),
    ("diffusion_model.noise_refiner.1.attention.qkv.weight", "noise_refiner.1"),
    ("diffusion_model.double_stream_blocks.2.block.attn1.to_q.weight", "double_stream_blocks.2"),
    ("diffusion_model.double_blocks.0.img_attn.qkv.weight[0:0:+64]", "double_blocks.0"),
    ("diffusion_model.txt_in.individual_token_refiner.blocks.1.self_attn.qkv.weight",
     "txt_in.individual_token_refiner.blocks.1"),
    ("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "down_blocks_1"),
    ("diffusion_model.final_layer.linear.weight", "final_layer"),
]


@pytest.mark.parametrize("key,block", BLOCKS)
def test_block_of(key, block):
    assert block_of(key) == block


def test_unreadable_structure_falls_back_to_the_name_rules(klora_pack):
    from klora_pack.nodes.attention_structure import SOURCE_NAMES, attention_rule, attention_weight_keys

    no_model = types.SimpleNamespace(model=types.SimpleNamespace())
    no_attention = types.SimpleNamespace(model=types.SimpleNamespace(
        diffusion_model=torch.nn.Sequential(torch.nn.Linear(2, 2))))
    for patcher in (no_model, no_attention):
        assert attention_weight_keys(patcher) is None
        rule = attention_rule(patcher)
        assert rule.source == SOURCE_NAMES and rule.keys is None
        assert rule.is_projection("diffusion_model.blocks.0.self_attn.q.weight")
        assert not rule.is_projection("diffusion_model.blocks.0.ffn.0.weight")


@pytest.mark.parametrize("family", ["flux", "chroma", "hunyuan_video"])
def test_single_stream_linear1_linear2_are_the_documented_special_case(klora_pack, family):
    """Attention and MLP share single_blocks.N.linear1/linear2: both count, by structure and by name."""
    from klora_pack.nodes.attention_structure import FUSED_ATTENTION_CHILDREN, attention_weight_keys

    model = fm.build_model(family)
    keys = attention_weight_keys(model)
    singles = {k for k in keys if ".single_blocks." in k}
    assert singles and all(k.endswith((".linear1.weight", ".linear2.weight")) for k in singles)
    blocks = [m for m in model.model.diffusion_model.modules() if type(m).__name__ in FUSED_ATTENTION_CHILDREN]
    assert len(singles) == 2 * len(blocks)


# ------------------------------------------------------------------ nothing mixed silently
def _fuse(tmp_path, model, subject_sd, style_sd, **kwargs):
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle

    handles = []
    for role, sd in (("subject", subject_sd), ("style", style_sd)):
        path = tmp_path / f"{role}.safetensors"
        lora_factory.save_lora(sd, path)
        handles.append(make_handle(role, path.name, str(path), 1.0))
    return fuse_model(model, *handles, **kwargs)


def test_attention_only_one_lora_covers_is_counted(klora_pack, tmp_path):
    """A style trained on Wan T2V (no k_img/v_img) with an I2V subject: the image projections are one-sided."""
    from klora_pack.klora_core.render import _coverage_footer

    model = fm.build_model("wan21_i2v")
    subject, _ = lora_factory.make_lora(model, "kohya", rank=4, seed=1)
    style, _ = lora_factory.make_lora(model, "comfy_peft", rank=2, seed=2)
    style = {k: v for k, v in style.items() if "_img." not in k}
    result = _fuse(tmp_path, model, subject, style)
    n_img = 2 * 2  # k_img and v_img in each of the 2 blocks
    assert result.stats["subject_only"] == n_img and result.stats["switched"] == fm.FAMILIES["wan21_i2v"].n_attention - n_img
    assert f"attention projections only one LoRA covers: {n_img} only in the subject LoRA and 0 only in the style" \
        in result.report
    assert "cross_attn.k_img" in result.report  # named in the one-sided list
    footer = "\n".join(_coverage_footer(result.plan))
    assert "only in the subject LoRA: blocks.0 cross_attn.k_img" in footer


@pytest.mark.parametrize("outside,wording", [("both", "get BOTH deltas at every step (mixed)"),
                                             ("subject", "get only the subject delta")])
def test_attention_left_outside_the_scope_is_flagged(klora_pack, tmp_path, monkeypatch, outside, wording):
    """When the structure misses projections the names catch, the report and the map say so."""
    from klora_pack.klora_core.render import _coverage_footer
    from klora_pack.nodes import fuse
    from klora_pack.nodes.attention_structure import AttentionRule, SOURCE_STRUCTURE, attention_weight_keys

    model = fm.build_model("wan21_t2v")
    partial = frozenset(k for k in attention_weight_keys(model) if ".cross_attn." not in k)
    monkeypatch.setattr(fuse, "attention_rule", lambda patcher: AttentionRule(partial, SOURCE_STRUCTURE))
    subject, _ = lora_factory.make_lora(model, "kohya", rank=4, seed=1)
    style, _ = lora_factory.make_lora(model, "comfy_peft", rank=2, seed=2)
    result = _fuse(tmp_path, model, subject, style, outside_scope=outside)
    n_cross = 2 * 4
    assert result.stats["unswitched_attention"] == n_cross == result.stats["outside"]
    assert f"WARNING: {n_cross} shared weights outside the scope look like attention projections and {wording}" \
        in result.report
    assert len(result.plan.unswitched) == n_cross and all(".cross_attn." in k for k in result.plan.unswitched)
    assert any(line.startswith(f"NOT SWITCHED: {n_cross} shared") for line in _coverage_footer(result.plan))
