# SPDX-License-Identifier: GPL-3.0-or-later
"""Module names of one layer in ComfyUI's layout and in the diffusers port of a model (no ComfyUI).

ComfyUI keeps each family's original module tree (``blocks.0.self_attn.q`` for
Wan); diffusers ports rename modules (``blocks.0.attn1.to_q``), and trainers
built on diffusers write those names.  :data:`PORT_NAMES` holds, once, the
renames that are one module for one module, written from both module trees:

- the pack's key map (nodes/diffusers_names.py) reads them ComfyUI -> port
  (:func:`port_name`) to load diffusers-named files inside ComfyUI;
- the command line and /klora/preview, which pair two files by normalised names
  without a model, read them port -> ComfyUI on ``_``-separated names
  (:func:`comfy_spelling`, via ``klora_core.lora_file.canonical_module_name``),
  so a musubi-tuner Wan file and a diffusers Wan file pair.  Two more spellings
  pair there: diffusion-pipe's HunyuanVideo names (``img_mod.linear``,
  ``img_mlp.fc1``: ComfyUI maps them itself) and Lumina 2's port against
  Z-Image's (``attn.to_q`` = ``attention.to_q``).

Not a name question, so not here (docs/families.md): a port that splits a fused
weight (``to_q``/``to_k``/``to_v`` of one ``qkv``: FLUX, HunyuanVideo, SD3.5,
PixArt, Lumina 2, Z-Image); inside ComfyUI the key map names the slices.

Placeholders in the patterns: ``{N}`` a block index, ``{qkv}``/``{kv}`` one of
those letters, ``{n12}``/``{n123}`` one of those digits, ``{block}`` a Lumina 2 /
Z-Image block (``layers.N``, ``noise_refiner.N``, ``context_refiner.N``).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

#: ``(family, ComfyUI module path, diffusers-port module path)``.
PORT_NAMES = (
    # Wan 2.x: diffusers' WanTransformer3DModel
    ("wan", "blocks.{N}.self_attn.{qkv}", "blocks.{N}.attn1.to_{qkv}"),
    ("wan", "blocks.{N}.self_attn.o", "blocks.{N}.attn1.to_out.0"),
    ("wan", "blocks.{N}.cross_attn.{qkv}", "blocks.{N}.attn2.to_{qkv}"),
    ("wan", "blocks.{N}.cross_attn.o", "blocks.{N}.attn2.to_out.0"),
    ("wan", "blocks.{N}.cross_attn.{kv}_img", "blocks.{N}.attn2.add_{kv}_proj"),
    ("wan", "blocks.{N}.ffn.0", "blocks.{N}.ffn.net.0.proj"),
    ("wan", "blocks.{N}.ffn.2", "blocks.{N}.ffn.net.2"),
    ("wan", "text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("wan", "text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("wan", "time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("wan", "time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("wan", "time_projection.1", "condition_embedder.time_proj"),
    ("wan", "img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("wan", "img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("wan", "head.head", "proj_out"),
    ("wan", "patch_embedding", "patch_embedding"),
    # LTX-Video: diffusers' LTXVideoTransformer3DModel (every other module keeps its name)
    ("ltxv", "patchify_proj", "proj_in"),
    ("ltxv", "adaln_single.emb.timestep_embedder.linear_{n12}", "time_embed.emb.timestep_embedder.linear_{n12}"),
    ("ltxv", "adaln_single.linear", "time_embed.linear"),
    # Lumina 2: diffusers' Lumina2Transformer2DModel (attention: see module docstring)
    ("lumina2", "{block}.feed_forward.w{n123}", "{block}.feed_forward.linear_{n123}"),
    ("lumina2", "{block}.adaLN_modulation.1", "{block}.norm1.linear"),
    ("lumina2", "t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1"),
    ("lumina2", "t_embedder.mlp.2", "time_caption_embed.timestep_embedder.linear_2"),
    ("lumina2", "cap_embedder.1", "time_caption_embed.caption_embedder.1"),
    ("lumina2", "final_layer.adaLN_modulation.1", "norm_out.linear_1"),
    ("lumina2", "final_layer.linear", "norm_out.linear_2"),
    # Z-Image: diffusers' ZImageTransformer2DModel (blocks keep ComfyUI's names)
    ("z_image", "x_embedder", "all_x_embedder.2-1"),
    ("z_image", "final_layer.linear", "all_final_layer.2-1.linear"),
    ("z_image", "final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
    # Cosmos Predict2: diffusers' CosmosTransformer3DModel (its Cosmos 2 layout)
    ("cosmos_predict2", "blocks.{N}.self_attn.{qkv}_proj", "transformer_blocks.{N}.attn1.to_{qkv}"),
    ("cosmos_predict2", "blocks.{N}.self_attn.output_proj", "transformer_blocks.{N}.attn1.to_out.0"),
    ("cosmos_predict2", "blocks.{N}.cross_attn.{qkv}_proj", "transformer_blocks.{N}.attn2.to_{qkv}"),
    ("cosmos_predict2", "blocks.{N}.cross_attn.output_proj", "transformer_blocks.{N}.attn2.to_out.0"),
    ("cosmos_predict2", "blocks.{N}.mlp.layer1", "transformer_blocks.{N}.ff.net.0.proj"),
    ("cosmos_predict2", "blocks.{N}.mlp.layer2", "transformer_blocks.{N}.ff.net.2"),
    ("cosmos_predict2", "blocks.{N}.adaln_modulation_self_attn.{n12}", "transformer_blocks.{N}.norm1.linear_{n12}"),
    ("cosmos_predict2", "blocks.{N}.adaln_modulation_cross_attn.{n12}", "transformer_blocks.{N}.norm2.linear_{n12}"),
    ("cosmos_predict2", "blocks.{N}.adaln_modulation_mlp.{n12}", "transformer_blocks.{N}.norm3.linear_{n12}"),
    ("cosmos_predict2", "t_embedder.1.linear_{n12}", "time_embed.t_embedder.linear_{n12}"),
    ("cosmos_predict2", "x_embedder.proj.1", "patch_embed.proj"),
    # written out (not ``linear_{n12}``) so that the clash with Lumina 2's port above is seen
    ("cosmos_predict2", "final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("cosmos_predict2", "final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("cosmos_predict2", "final_layer.linear", "proj_out"),
)
#: Port names the command line leaves alone: other families give the same name to another layer
#: (``proj_out``, ``patch_embedding``), or two ports name two different layers alike (``norm_out.linear_1``
#: is Lumina 2's ``final_layer.adaLN_modulation.1`` and Cosmos Predict2's ``final_layer.adaln_modulation.1``).
AMBIGUOUS_PORT_NAMES = frozenset({"proj_out", "patch_embedding"}) | frozenset(
    port for _, comfy, port in PORT_NAMES
    if any(other_port == port and other_comfy != comfy for _, other_comfy, other_port in PORT_NAMES))
#: Further spellings that pair in the command line: ``(port pattern, ComfyUI pattern)``.
_CLI_ONLY = (
    ("double_blocks.{N}.{side}_mod.linear", "double_blocks.{N}.{side}_mod.lin"),  # diffusion-pipe HunyuanVideo
    ("single_blocks.{N}.modulation.linear", "single_blocks.{N}.modulation.lin"),
    ("double_blocks.{N}.{side}_mlp.fc1", "double_blocks.{N}.{side}_mlp.0"),
    ("double_blocks.{N}.{side}_mlp.fc2", "double_blocks.{N}.{side}_mlp.2"),
    ("txt_in.individual_token_refiner.blocks.{N}.mlp.fc1", "txt_in.individual_token_refiner.blocks.{N}.mlp.0"),
    ("txt_in.individual_token_refiner.blocks.{N}.mlp.fc2", "txt_in.individual_token_refiner.blocks.{N}.mlp.2"),
    ("{block}.attn.to_{qkv}", "{block}.attention.to_{qkv}"),  # Lumina 2's port -> Z-Image's
    ("{block}.attn.to_out.0", "{block}.attention.to_out.0"),
)

_SLOTS = {"N": r"\d+", "qkv": "[qkv]", "kv": "[kv]", "n12": "[12]", "n123": "[123]", "side": "img|txt",
          "block": "(?:layers|noise_refiner|context_refiner){sep}\\d+"}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@lru_cache(maxsize=None)
def _regex(pattern: str, sep: str) -> re.Pattern:
    """``pattern`` as a regex on names whose parts are separated by ``sep`` (``.`` or ``_``)."""
    out, last = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[last:m.start()].replace(".", sep)))
        out.append(f"(?P<{m[1]}>{_SLOTS[m[1]].format(sep=re.escape(sep))})")
        last = m.end()
    out.append(re.escape(pattern[last:].replace(".", sep)))
    return re.compile("".join(out))


def _render(pattern: str, values: dict, sep: str) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m[1]], pattern.replace(".", sep))


def translate(name: str, source: str, target: str, sep: str = ".") -> Optional[str]:
    """``target`` filled from ``name`` when ``name`` matches pattern ``source`` whole, else None."""
    m = _regex(source, sep).fullmatch(name)
    return _render(target, m.groupdict(), sep) if m else None


def port_name(family: str, path: str) -> Optional[str]:
    """The diffusers-port module path of ComfyUI module ``path`` of ``family`` (a :data:`PORT_NAMES` family)."""
    for fam, comfy, port in PORT_NAMES:
        if fam == family:
            name = translate(path, comfy, port)
            if name is not None:
                return name
    return None


def comfy_spelling(name: str) -> str:
    """A prefix-free, ``_``-separated port name in ComfyUI's spelling when it is a known alias, else unchanged."""
    for source, target in _CLI_ONLY + tuple((port, comfy) for _, comfy, port in PORT_NAMES
                                            if port not in AMBIGUOUS_PORT_NAMES):
        out = translate(name, source, target, "_")
        if out is not None:
            return out
    return name
