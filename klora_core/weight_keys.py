"""The name rules: which weight is an attention projection, and which block it belongs to, from its name.

Pure string logic, no ComfyUI import.  Inside ComfyUI the Fuse node decides
"attention projection" from the loaded model's structure
(``nodes/attention_structure.py``); these name rules are its fallback when the
structure cannot be read, and the only rule of the command line and the
/klora/preview route, which have LoRA files but no model.  The tests hold
both rules to the same answer on every supported family
(tests/test_family_matrix.py).

K-LoRA's paper scores every attention projection (q, k, v, out) of every
attention layer.  Each family spells them differently; a name is first
written in one form (:func:`module_path`: no ``diffusion_model.`` and
``.weight``, every ``.`` as ``_``, which is also how the command line's
canonical LoRA module names look), then an attention projection is
``<container>_<projection>`` at the end of the name, where the container is
``attn``, ``attnN``, ``attention`` or ``attentionN`` (also as the last part of
``self_attn``, ``cross_attn``, ``img_attn``, ``self_attention``...) and the
projection one of ``_PROJECTIONS``:

- SD1.5/SDXL, LTXV: ``attn1.to_q`` ... ``attn2.to_out.0``
- FLUX, Chroma, HunyuanVideo: ``img_attn.qkv``/``proj``, ``txt_attn.*``;
  HunyuanVideo's token refiner ``self_attn.qkv``/``proj``
- SD3.5: ``x_block.attn.qkv``/``proj``, ``attn2.*``; PixArt ``attn.qkv``/``proj``,
  ``cross_attn.q_linear``/``kv_linear``/``proj``
- Qwen-Image: ``attn.to_q/k/v``, ``add_q/k/v_proj``, ``to_out.0``, ``to_add_out``
- HiDream: ``attn1.to_q/k/v/out`` and the text stream's ``to_q_t/k_t/v_t/out_t``
- Lumina 2, Z-Image: ``attention.qkv``, ``attention.out``
- Wan 2.x: ``self_attn.q/k/v/o``, ``cross_attn.q/k/v/o``, I2V ``k_img``/``v_img``
- Cosmos Predict2: ``*_attn.q_proj/k_proj/v_proj/output_proj``
- AuraFlow: ``attn.w1q ... w1o``, ``w2q ... w2o``; Stable Cascade ``attention.attn.to_q/k/v/out_proj``
- Kandinsky 5: ``self_attention``/``cross_attention`` ``to_query/to_key/to_value/out_layer``
- Mochi: ``attn.qkv_x``/``qkv_y``/``proj_x``/``proj_y``

Special case (documented and tested): FLUX-style single-stream blocks
(FLUX, Chroma, HunyuanVideo) fuse attention and MLP into ``single_blocks.N.linear1``
(q, k, v and the MLP input) and ``linear2`` (attention output and MLP output);
they count as attention projections since they hold them, and so do the
diffusers names of those slices (``single_transformer_blocks.N.proj_mlp``,
``proj_out``).
"""
from __future__ import annotations

import re

_PROJECTIONS = (
    "to_q", "to_k", "to_v", "to_out", "to_out_0", "to_qkv", "to_kv", "to_add_out",
    "add_q_proj", "add_k_proj", "add_v_proj",
    "to_q_t", "to_k_t", "to_v_t", "to_out_t",
    "q", "k", "v", "o", "kv", "qkv", "proj", "out", "k_img", "v_img",
    "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "output_proj", "qkv_proj",
    "q_linear", "kv_linear", "wq", "wk", "wv", "wo",
    "w1q", "w1k", "w1v", "w1o", "w2q", "w2k", "w2v", "w2o",
    "to_query", "to_key", "to_value", "out_layer",
    "qkv_x", "qkv_y", "proj_x", "proj_y",
)
_ATTENTION_NAME = re.compile(
    r"(?:^|_)(?:attn|attention)\d*_(?:" + "|".join(sorted(_PROJECTIONS, key=len, reverse=True)) + r")$"
)
# FLUX-style single-stream blocks: attention fused with the MLP (see module docstring).
_FUSED_SINGLE_STREAM = re.compile(r"(?:^|_)single_blocks_\d+_linear[12]$|(?:^|_)single_transformer_blocks_\d+_(?:proj_mlp|proj_out)$")
_TEXT_ENCODER = ("te1_", "te2_")
WRAPPER_PREFIX = re.compile(r"^(?:model\.diffusion_model\.|diffusion_model\.|lora_unet_|unet\.|transformer\.)")


def weight_name(key) -> str:
    """The model weight key of a patch key (``str`` or ``(str, offset, ...)`` tuple)."""
    return key if isinstance(key, str) else str(key[0])


def module_path(name: str) -> str:
    """``name`` in the one form the rules read: wrapper prefix and ``.weight`` dropped, ``.`` as ``_``.

    ``"diffusion_model.blocks.0.self_attn.q.weight"`` -> ``"blocks_0_self_attn_q"``;
    a command-line canonical module name (already in this form) is returned unchanged.
    """
    name = WRAPPER_PREFIX.sub("", name)
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name.replace(".", "_")


def is_attention_name(name: str) -> bool:
    """True when module ``name`` (dotted or underscored, see :func:`module_path`) is an attention projection.

    Text-encoder modules (``te1_``/``te2_``, the command line's names) never are.
    """
    path = module_path(name)
    if path.startswith(_TEXT_ENCODER):
        return False
    return bool(_ATTENTION_NAME.search(path) or _FUSED_SINGLE_STREAM.search(path))


def is_attention_projection(key) -> bool:
    """True when model weight ``key`` (a ``....weight`` key or unit tuple) is an attention projection by name."""
    name = weight_name(key)
    return name.endswith(".weight") and is_attention_name(name)


def display_key(key) -> str:
    """A readable one-line name for a patch key (offsets shown as ``[start:+size]``)."""
    if isinstance(key, str):
        return key
    name = str(key[0])
    if len(key) > 1 and key[1] is not None:
        dim, start, size = key[1]
        name += f"[{dim}:{start}:+{size}]"
    return name


_SPLIT = re.compile(r"[._]")


def block_of(key) -> str:
    """The block a weight belongs to, for grouping rows of the selection map.

    The name (wrapper prefix dropped) up to its first numeric index
    (``double_blocks.3``, ``layers.0``, ``noise_refiner.1``,
    ``txt_in.individual_token_refiner.blocks.0``, ``down_blocks_1`` of a
    command-line name), or up to a singular ``..._block`` part that comes
    first (``middle_block``, ``mid_block``: one block, whose index counts its
    sub-modules).  Names without either: the first dotted part, else "other".
    """
    name = WRAPPER_PREFIX.sub("", display_key(key))
    parts = _SPLIT.split(name)
    end = 0
    for i, part in enumerate(parts):
        end += len(part)
        if part.isdigit() and i > 0:
            return name[:end]
        if part == "block" and i > 0:
            return name[:end]
        end += 1  # the separator after this part
    return name.split(".")[0] if "." in name else "other"
