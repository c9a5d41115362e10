# SPDX-License-Identifier: GPL-3.0-or-later
"""One spelling for module names that trainers write differently for the same layer (no ComfyUI).

The command line and the /klora/preview route pair two LoRA files by their
normalised module names (:func:`klora_core.lora_file.canonical_module_name`),
without a model.  Where two trainers name the SAME layer differently, and the
difference is only a name, :func:`comfy_spelling` rewrites the diffusers-port
name into ComfyUI's spelling (which kohya-style trainers such as musubi-tuner
and diffusion-pipe also write), so both files pair:

- Wan 2.x (diffusers ``blocks.N.attn1.to_q`` = ``blocks.N.self_attn.q``;
  ``attn2`` = ``cross_attn``, ``add_k_proj`` = ``k_img``, ``ffn.net.0.proj`` = ``ffn.0``,
  ``condition_embedder.*`` = ``text_embedding``/``time_embedding``/``time_projection``/``img_emb``;
  not the output layer ``proj_out`` = ``head.head``: many families call a different layer ``proj_out``);
- HunyuanVideo as diffusion-pipe writes it (``img_mod.linear`` = ``img_mod.lin``,
  ``img_mlp.fc1`` = ``img_mlp.0``, ``modulation.linear`` = ``modulation.lin``);
- LTX-Video (``proj_in`` = ``patchify_proj``, ``time_embed`` = ``adaln_single``);
- Lumina 2's diffusers port against Z-Image's (``attn.to_q`` = ``attention.to_q``,
  ``feed_forward.linear_1`` = ``feed_forward.w1``, ``norm1.linear`` = ``adaLN_modulation.1``,
  ``norm_out.linear_1/2``, ``time_caption_embed.*``) and Z-Image's ``all_x_embedder.2-1``,
  ``all_final_layer.2-1.*``.

Not a name question, so left apart (docs/families.md): a diffusers port that
splits a fused weight (FLUX, Chroma, HunyuanVideo, SD3.5, PixArt, Lumina 2 and
Z-Image ``to_q/to_k/to_v`` against ComfyUI's ``qkv``) pairs only with files of
the same layout; inside ComfyUI the Fuse node pairs them by weight.

Names arrive with wrapper prefixes removed and every ``.`` written as ``_``.
"""
from __future__ import annotations

import re

_LUMINA_BLOCK = r"((?:layers|noise_refiner|context_refiner)_\d+)_"

#: ``(regex, replacement)`` applied in order with ``re.fullmatch`` semantics; the first match wins.
_ALIASES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    # Wan 2.x, diffusers port -> ComfyUI
    (r"blocks_(\d+)_attn1_to_([qkv])", r"blocks_\1_self_attn_\2"),
    (r"blocks_(\d+)_attn1_to_out_0", r"blocks_\1_self_attn_o"),
    (r"blocks_(\d+)_attn2_to_([qkv])", r"blocks_\1_cross_attn_\2"),
    (r"blocks_(\d+)_attn2_to_out_0", r"blocks_\1_cross_attn_o"),
    (r"blocks_(\d+)_attn2_add_([kv])_proj", r"blocks_\1_cross_attn_\2_img"),
    (r"blocks_(\d+)_ffn_net_0_proj", r"blocks_\1_ffn_0"),
    (r"blocks_(\d+)_ffn_net_2", r"blocks_\1_ffn_2"),
    (r"condition_embedder_(text|time)_embedder_linear_1", r"\1_embedding_0"),
    (r"condition_embedder_(text|time)_embedder_linear_2", r"\1_embedding_2"),
    (r"condition_embedder_time_proj", "time_projection_1"),
    (r"condition_embedder_image_embedder_ff_net_0_proj", "img_emb_proj_1"),
    (r"condition_embedder_image_embedder_ff_net_2", "img_emb_proj_3"),
    # HunyuanVideo as diffusion-pipe writes it -> ComfyUI
    (r"(double_blocks_\d+_(?:img|txt)_mod)_linear", r"\1_lin"),
    (r"(single_blocks_\d+_modulation)_linear", r"\1_lin"),
    (r"(double_blocks_\d+_(?:img|txt)_mlp|txt_in_individual_token_refiner_blocks_\d+_mlp)_fc1", r"\1_0"),
    (r"(double_blocks_\d+_(?:img|txt)_mlp|txt_in_individual_token_refiner_blocks_\d+_mlp)_fc2", r"\1_2"),
    # LTX-Video, diffusers port -> ComfyUI
    (r"proj_in", "patchify_proj"),
    (r"time_embed_(emb_timestep_embedder_linear_[12]|linear)", r"adaln_single_\1"),
    # Lumina 2's diffusers port -> Z-Image's port (= ComfyUI's names outside the split q/k/v)
    (_LUMINA_BLOCK + r"attn_(to_[qkv]|to_out_0)", r"\1_attention_\2"),
    (_LUMINA_BLOCK + r"feed_forward_linear_([123])", r"\1_feed_forward_w\2"),
    (_LUMINA_BLOCK + r"norm1_linear", r"\1_adaLN_modulation_1"),
    (r"time_caption_embed_timestep_embedder_linear_1", "t_embedder_mlp_0"),
    (r"time_caption_embed_timestep_embedder_linear_2", "t_embedder_mlp_2"),
    (r"time_caption_embed_caption_embedder_1", "cap_embedder_1"),
    (r"norm_out_linear_1", "final_layer_adaLN_modulation_1"),
    (r"norm_out_linear_2", "final_layer_linear"),
    # Z-Image's diffusers port -> ComfyUI
    (r"all_x_embedder_2-1", "x_embedder"),
    (r"all_final_layer_2-1_(.+)", r"final_layer_\1"),
))


def comfy_spelling(name: str) -> str:
    """``name`` (prefix-free, ``_``-separated) in ComfyUI's spelling when it is a known alias, else unchanged."""
    for pattern, replacement in _ALIASES:
        m = pattern.fullmatch(name)
        if m:
            return m.expand(replacement)
    return name
