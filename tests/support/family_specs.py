"""The family table of the family matrix: each model family's ComfyUI class at test size.

A :class:`FamilySpec` says which ``comfy.supported_models`` class to build,
its reduced config, the conditioning and latent it samples with, and, written
from the family's architecture (the published model code, NOT from this
pack), which weights are attention projections and which block each belongs
to.  Add a family by adding a spec to ``_SPECS``; :mod:`support.family_models`
builds and samples them.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class FamilySpec:
    """One model family at test size.

    name: table key; title: what users call it; config_class: attribute of
    ``comfy.supported_models``; unet_config: the reduced config (before the
    class adds its ``unet_extra_config``); latent: latent shape without batch
    (4-D ``(C, H, W)`` or video ``(C, T, H, W)``); context: ``(tokens, width)``
    of the text conditioning; extras: ``(batch, gen) -> dict`` of further
    conditioning entries (pooled output, guidance, image embeddings...);
    attention: regex (fullmatch) on module paths of every attention q/k/v/out
    projection; n_attention: how many such weights the reduced model has;
    blocks: regex (search) whose match on a weight key is its block;
    steps: sampling steps used by the matrix; cfg: the matrix's CFG;
    slow: mark the family's sampling tests ``slow``; optional_config: keys
    that only some ComfyUI versions' model classes take (added only when
    ``params_class``, a dotted dataclass or class path, accepts them);
    native: load through ComfyUI's own detection (``comfy.sd.load_diffusion_model_state_dict``),
    which must pick ``config_class`` (the family's smallest detectable size).
    """

    name: str
    title: str
    config_class: str
    unet_config: dict
    latent: tuple
    context: tuple
    attention: str
    n_attention: int
    blocks: str
    extras: Callable = None
    steps: int = 3
    cfg: float = 2.0
    slow: bool = False
    notes: str = ""
    optional_config: dict = field(default_factory=dict)
    params_class: str = ""
    native: bool = False


def _pooled(width: int) -> Callable:
    return lambda batch, gen: {"pooled_output": torch.randn((batch, width), generator=gen)}


def _flux_extras(batch, gen):
    return {"pooled_output": torch.randn((batch, 32), generator=gen), "guidance": 3.5}


def _hunyuan_extras(batch, gen):
    return {"pooled_output": torch.randn((batch, 32), generator=gen), "guidance": 6.0}


def _hidream_extras(batch, gen):
    # Llama-3 hidden states of every layer [B, layers, T, C] (two layers at test size) and a pooled vector.
    return {"pooled_output": torch.randn((batch, 32), generator=gen),
            "conditioning_llama3": torch.randn((batch, 2, 4, 32), generator=gen)}


def _wan_i2v_extras(batch, gen):
    # CLIP-vision penultimate hidden states (1280 wide, fixed by WanModel's img_emb); 4 tokens at test size.
    states = torch.randn((batch, 4, 1280), generator=gen)
    return {"clip_vision_output": types.SimpleNamespace(penultimate_hidden_states=states)}


def _cascade_extras(batch, gen):
    return {"pooled_output": torch.randn((batch, 1, 32), generator=gen)}


def _sd_unet(base: str) -> dict:
    from support import tiny_models

    return dict(tiny_models.CONFIGS[base])


def _wan(model_type: str, in_dim: int, out_dim: int, **wider) -> dict:
    """Wan 2.x config: 2 blocks, width 64 in 2 heads unless ``wider`` overrides."""
    return {"image_model": "wan2.1", "model_type": model_type, "patch_size": (1, 2, 2), "in_dim": in_dim,
            "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "out_dim": out_dim, "num_heads": 2,
            "num_layers": 2, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, **wider}


def _lumina(**overrides) -> dict:
    """Lumina 2 / Z-Image (NextDiT) config: one main layer, one noise and one context refiner layer."""
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 1,
            "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 4.0,
            "qk_norm": True, "cap_feat_dim": 32, "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512],
            "rope_theta": 10000.0, **overrides}


def _hunyuan(**overrides) -> dict:
    """HunyuanVideo config: one double and one single block (two token-refiner blocks are fixed)."""
    return {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
            "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2],
            "qkv_bias": True, "guidance_embed": True, **overrides}


#: HunyuanVideoParams fields some ComfyUI versions require and others reject.
_HUNYUAN_OPTIONAL = dict(
    optional_config={"byt5": False, "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None,
                     "meanflow_sum": False},
    params_class="comfy.ldm.hunyuan_video.model.HunyuanVideoParams")
FLUX_ATTENTION = r"double_blocks\.\d+\.(img_attn|txt_attn)\.(qkv|proj)|single_blocks\.\d+\.linear[12]"
FLUX_BLOCKS = r"(double_blocks|single_blocks)\.\d+"
HUNYUAN_ATTENTION = FLUX_ATTENTION + r"|txt_in\.individual_token_refiner\.blocks\.\d+\.self_attn\.(qkv|proj)"
HUNYUAN_BLOCKS = FLUX_BLOCKS + r"|txt_in\.individual_token_refiner\.blocks\.\d+"
WAN_ATTENTION = r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]"
LUMINA_ATTENTION = r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)"
LUMINA_BLOCKS = r"(layers|noise_refiner|context_refiner)\.\d+"

_SPECS = [
    FamilySpec(
        "sd15", "SD1.5", "SD15", _sd_unet("sd15"), (4, 8, 8), (77, 768),
        r"(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.transformer_blocks\.\d+\."
        r"attn[12]\.(to_q|to_k|to_v|to_out\.0)",
        # transformers at input blocks 1, 4, the middle, output blocks 0-3: 7 x 2 attentions x 4
        56, r"input_blocks\.\d+|middle_block|output_blocks\.\d+"),
    FamilySpec(
        "sdxl", "SDXL", "SDXL", _sd_unet("sdxl"), (4, 8, 8), (77, 2048),
        r"(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.transformer_blocks\.\d+\."
        r"attn[12]\.(to_q|to_k|to_v|to_out\.0)",
        # transformer_depth [0, 1]: input block 4, the middle, output blocks 2 and 3: 4 x 8
        32, r"input_blocks\.\d+|middle_block|output_blocks\.\d+", extras=_pooled(1280)),
    FamilySpec(
        "sd35", "SD3.5", "SD3", {
            "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
            "adm_in_channels": 32, "pos_embed_max_size": 8, "num_patches": 64, "qk_norm": "rms",
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
            "x_block_self_attn_layers": [0],
        }, (16, 8, 8), (6, 32),
        r"joint_blocks\.\d+\.(x_block\.attn2?|context_block\.attn)\.(qkv|proj)",
        # 2 blocks x (x attn qkv+proj, context attn qkv+proj) + block 0's x attn2 (SD3.5 medium),
        # minus the last context block's proj (pre-only): 4 + 4 + 2 - 1
        9, r"joint_blocks\.\d+", extras=_pooled(32)),
    FamilySpec(
        "flux", "FLUX.1", "Flux", _sd_unet("flux"), (16, 8, 8), (8, 32),
        FLUX_ATTENTION, 2 * 4 + 2 * 2, FLUX_BLOCKS, extras=_flux_extras, cfg=1.0,
        optional_config={"txt_ids_dims": []}, params_class="comfy.ldm.flux.model.FluxParams"),
    FamilySpec(
        "chroma", "Chroma", "Chroma", {
            "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32,
            "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
            "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
            "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1,
        }, (16, 8, 8), (6, 32), FLUX_ATTENTION, 4 + 2, FLUX_BLOCKS,
        extras=lambda batch, gen: {"pooled_output": None},
        optional_config={"txt_ids_dims": [], "vec_in_dim": None}, params_class="comfy.ldm.chroma.model.ChromaParams"),
    FamilySpec(
        "hidream", "HiDream-I1", "HiDream", {
            "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
            "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2,
            "caption_channels": [32, 32], "text_emb_dim": 32, "num_routed_experts": 2,
            "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8], "max_resolution": [16, 16],
            "llama_layers": [0, 1],
        }, (16, 8, 8), (4, 32),
        r"double_stream_blocks\.\d+\.block\.attn1\.(to_q|to_k|to_v|to_out)(_t)?"
        r"|single_stream_blocks\.\d+\.block\.attn1\.(to_q|to_k|to_v|to_out)",
        8 + 4, r"(double_stream_blocks|single_stream_blocks)\.\d+", extras=_hidream_extras),
    FamilySpec(
        "qwen_image", "Qwen-Image", "QwenImage", {
            "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
            "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
            "axes_dims_rope": [8, 12, 12],
        }, (16, 1, 8, 8), (6, 32),
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)",
        2 * 8, r"transformer_blocks\.\d+"),
    FamilySpec(
        "lumina2", "Lumina Image 2.0", "Lumina2", _lumina(), (16, 8, 8), (6, 32), LUMINA_ATTENTION, 3 * 2,
        LUMINA_BLOCKS, notes="grouped-query: 2 query heads, 1 k/v head"),
    FamilySpec(
        "z_image", "Z-Image", "ZImage",
        _lumina(dim=256, n_kv_heads=2, ffn_dim_multiplier=8.0 / 3.0, axes_dims=[32, 48, 48], axes_lens=[64, 64, 64],
                rope_theta=256.0, z_image_modulation=True, time_scale=1000.0),
        (16, 8, 8), (6, 32), LUMINA_ATTENTION, 3 * 2, LUMINA_BLOCKS,
        notes="z_image_modulation needs dim >= 256 (its adaLN input is min(dim, 256) wide)"),
    FamilySpec("wan21_t2v", "Wan 2.1 T2V", "WAN21_T2V", _wan("t2v", 16, 16), (16, 2, 8, 8), (6, 32),
               WAN_ATTENTION, 2 * 8, r"blocks\.\d+"),
    FamilySpec("wan21_i2v", "Wan 2.1 I2V", "WAN21_I2V", _wan("i2v", 36, 16), (16, 2, 8, 8), (6, 32),
               r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.([qkvo]|k_img|v_img))", 2 * 10, r"blocks\.\d+",
               extras=_wan_i2v_extras),
    FamilySpec("wan22", "Wan 2.2 TI2V", "WAN22_T2V", _wan("t2v", 48, 48), (48, 2, 8, 8), (6, 32),
               WAN_ATTENTION, 2 * 8, r"blocks\.\d+"),
    FamilySpec(
        # What comfy/model_detection.py derives for Wan 2.1: heads = dim // 128, text 4096 wide, freq 256.
        "wan21_t2v_native", "Wan 2.1 T2V (natively detected)", "WAN21_T2V",
        _wan("t2v", 16, 16, dim=128, ffn_dim=256, freq_dim=256, text_dim=4096, num_heads=1),
        (16, 2, 8, 8), (6, 4096), WAN_ATTENTION, 2 * 8, r"blocks\.\d+", native=True),
    FamilySpec(
        "hunyuan_video", "HunyuanVideo", "HunyuanVideo", _hunyuan(), (16, 2, 8, 8), (6, 32),
        HUNYUAN_ATTENTION,
        # 1 double block (4) + 1 single block (2) + 2 token-refiner blocks (2 each)
        4 + 2 + 2 * 2, HUNYUAN_BLOCKS,
        extras=_hunyuan_extras, cfg=1.0, **_HUNYUAN_OPTIONAL),
    FamilySpec(
        # Detection: heads = hidden // 128, axes [16, 56, 56], vec_in_dim 768, theta 256, mlp_ratio 4.
        "hunyuan_video_native", "HunyuanVideo (natively detected)", "HunyuanVideo",
        _hunyuan(vec_in_dim=768, hidden_size=128, num_heads=1, axes_dim=[16, 56, 56]), (16, 2, 8, 8), (6, 32),
        HUNYUAN_ATTENTION,
        4 + 2 + 2 * 2, HUNYUAN_BLOCKS,
        extras=lambda batch, gen: {"pooled_output": torch.randn((batch, 768), generator=gen), "guidance": 6.0},
        cfg=1.0, native=True, **_HUNYUAN_OPTIONAL),
    FamilySpec(
        "ltxv", "LTX-Video", "LTXV", {
            "image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
            "num_attention_heads": 2, "caption_channels": 32, "num_layers": 2,
        }, (128, 2, 4, 4), (6, 32),
        r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)", 2 * 8, r"transformer_blocks\.\d+",
        extras=lambda batch, gen: {"attention_mask": torch.ones((batch, 6), dtype=torch.long)}),
    FamilySpec(
        "cosmos_predict2", "Cosmos Predict2", "CosmosT2IPredict2", {
            "image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
            "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
            "concat_padding_mask": True, "model_channels": 64, "num_blocks": 2, "num_heads": 2,
            "mlp_ratio": 4.0, "crossattn_emb_channels": 32, "pos_emb_cls": "rope3d", "pos_emb_learnable": True,
            "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True,
            "adaln_lora_dim": 16, "rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0,
            "rope_t_extrapolation_ratio": 1.0, "extra_per_block_abs_pos_emb": False,
            "rope_enable_fps_modulation": False,
        }, (16, 1, 8, 8), (6, 32),
        r"blocks\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|output_proj)", 2 * 8, r"blocks\.\d+"),
    FamilySpec(
        "pixart", "PixArt-Sigma", "PixArtSigma", {
            "image_model": "pixart_sigma", "input_size": 8, "patch_size": 2, "in_channels": 4,
            "hidden_size": 64, "depth": 2, "num_heads": 2, "caption_channels": 32, "model_max_length": 6,
            "micro_condition": False, "pe_interpolation": 1.0,
        }, (4, 64, 4), (6, 32),
        r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj))", 2 * 5, r"blocks\.\d+"),
    FamilySpec(
        "auraflow", "AuraFlow", "AuraFlow", {
            "in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2,
            "n_double_layers": 1, "n_heads": 2, "global_conddim": 64, "cond_seq_dim": 32, "max_seq": 64,
        }, (4, 8, 8), (6, 32),
        r"double_layers\.\d+\.attn\.w[12][qkvo]|single_layers\.\d+\.attn\.w1[qkvo]", 8 + 4,
        r"(double_layers|single_layers)\.\d+"),
    FamilySpec(
        "stable_cascade", "Stable Cascade (stage C)", "Stable_Cascade_C", {
            "stable_cascade_stage": "c", "c_in": 16, "c_out": 16, "c_r": 64, "patch_size": 1, "c_cond": 64,
            "c_hidden": [32, 64], "nhead": [2, 2], "blocks": [[1, 1], [1, 1]],
            "block_repeat": [[1, 1], [1, 1]], "level_config": ["CTA", "CTA"], "c_clip_text": 32,
            "c_clip_text_pooled": 32, "c_clip_img": 768, "c_clip_seq": 4, "kernel_size": 3,
            "dropout": [0.0, 0.0], "self_attn": True, "t_conds": ["sca", "crp"], "switch_level": [False],
        }, (16, 8, 8), (6, 32),
        r"(down_blocks|up_blocks)\.\d+\.\d+\.attention\.attn\.(to_q|to_k|to_v|out_proj)", 4 * 4,
        r"(down_blocks|up_blocks)\.\d+", extras=_cascade_extras),
    FamilySpec(
        "kandinsky5", "Kandinsky 5", "Kandinsky5", {
            "image_model": "kandinsky5", "in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 32,
            "in_text_dim2": 32, "time_dim": 32, "patch_size": (1, 2, 2), "model_dim": 64, "ff_dim": 128,
            "num_text_blocks": 1, "num_visual_blocks": 1, "axes_dims": (8, 12, 12), "visual_cond": True,
        }, (16, 2, 8, 8), (6, 32),
        r"text_transformer_blocks\.\d+\.self_attention\.(to_query|to_key|to_value|out_layer)"
        r"|visual_transformer_blocks\.\d+\.(self_attention|cross_attention)\.(to_query|to_key|to_value|out_layer)",
        4 + 8, r"(text_transformer_blocks|visual_transformer_blocks)\.\d+", extras=_pooled(32)),
]

FAMILIES = {spec.name: spec for spec in _SPECS}
NAMES = tuple(FAMILIES)


def spec_of(name_or_spec) -> FamilySpec:
    if isinstance(name_or_spec, FamilySpec):
        return name_or_spec
    if name_or_spec not in FAMILIES:
        raise ValueError(f"unknown family {name_or_spec!r}; expected one of {NAMES}")
    return FAMILIES[name_or_spec]
