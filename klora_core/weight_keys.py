"""Classify model weight keys (pure string logic, no ComfyUI import).

K-LoRA's paper scores every attention projection (to_q, to_k, to_v, to_out) of
every attention layer.  ComfyUI names weights after the original model code,
so each family spells them differently:

- SD1.5/SDXL UNets: ``...transformer_blocks.N.attn1.to_q.weight`` (attn1/attn2,
  to_q/to_k/to_v/to_out.0)
- FLUX: ``double_blocks.N.img_attn.qkv.weight``, ``...img_attn.proj``,
  ``txt_attn.qkv/proj``; single blocks fuse attention and MLP into
  ``single_blocks.N.linear1`` (q, k, v, mlp-in) and ``linear2`` (out, mlp-out),
  which we count as attention projections since they hold them.
- SD3/MMDiT and most DiTs: ``attn.qkv``, ``attn.proj``, ``self_attn.q/k/v/o``,
  ``cross_attn.q/k/v/o``, ``*_proj``.
"""
from __future__ import annotations

import re

_ATTENTION_CONTAINER = re.compile(r"(^|\.)(attn\d*|attention\d*|self_attn|cross_attn|img_attn|txt_attn|attn_\w+|\w+_attn)(\.|$)")
_PROJECTION_LEAF = {
    "to_q", "to_k", "to_v", "to_out", "to_out.0", "to_qkv",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "q", "k", "v", "o", "qkv", "proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
    "wq", "wk", "wv", "wo", "qkv_proj", "kv", "to_kv",
}
_FLUX_SINGLE = re.compile(r"(^|\.)single_blocks\.\d+\.(linear1|linear2)\.weight$")


def weight_name(key) -> str:
    """The model weight key of a patch key (``str`` or ``(str, offset, ...)`` tuple)."""
    return key if isinstance(key, str) else str(key[0])


def is_attention_projection(key) -> bool:
    """True when ``key`` names the weight of an attention q/k/v/out projection."""
    name = weight_name(key)
    if not name.endswith(".weight"):
        return False
    if _FLUX_SINGLE.search(name):
        return True
    module = name[: -len(".weight")]
    for leaf in _PROJECTION_LEAF:
        if module.endswith("." + leaf):
            parent = module[: -len(leaf) - 1]
            if _ATTENTION_CONTAINER.search(parent + "."):
                return True
    return False


def display_key(key) -> str:
    """A readable one-line name for a patch key (offsets shown as ``[start:+size]``)."""
    if isinstance(key, str):
        return key
    name = str(key[0])
    if len(key) > 1 and key[1] is not None:
        dim, start, size = key[1]
        name += f"[{dim}:{start}:+{size}]"
    return name


def block_of(key) -> str:
    """The block a weight belongs to, for grouping rows of the selection map."""
    name = weight_name(key)
    parts = name.split(".")
    if parts and parts[0] == "diffusion_model":
        parts = parts[1:]
    for i, part in enumerate(parts):
        if part in ("input_blocks", "output_blocks", "double_blocks", "single_blocks", "blocks", "layers",
                    "transformer_blocks", "joint_blocks", "down_blocks", "up_blocks") and i + 1 < len(parts):
            return ".".join(parts[: i + 2])
        if part in ("middle_block", "mid_block"):
            return part
    return parts[0] if parts else name
