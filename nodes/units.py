"""Units: what K-LoRA switches as one piece, and weights the two files cover in different layouts.

ComfyUI's LoRA parsing yields patch keys that are either a weight name or
``(weight name, (dim, start, length)[, function])`` for a slice of a fused
weight (FLUX's q, k, v inside ``img_attn.qkv``).  When both files use the same
keys for a weight, each key is one unit.  When they cover the same weight in
different layouts (a kohya FLUX file patches the whole fused ``qkv``, a
diffusers file patches its q, k, v slices), the weight becomes ONE unit whose
value on each side is a *parts* bundle of that side's patches; its delta is the
whole weight's delta and its rank the sum of the parts' ranks.
"""
from __future__ import annotations

from collections import defaultdict

from ..klora_core.weight_keys import weight_name

PARTS_TAG = "klora_parts"


def unit_offset(unit_key):
    """(offset, function) of a ComfyUI patch key (``str`` or ``(name, offset[, function])``)."""
    if isinstance(unit_key, str):
        return None, None
    offset = unit_key[1] if len(unit_key) > 1 else None
    function = unit_key[2] if len(unit_key) > 2 else None
    return offset, function


def make_parts(items) -> tuple:
    """A parts bundle: ``(PARTS_TAG, ((unit_key, value), ...))`` (plain tuples, so ComfyUI may copy it)."""
    return (PARTS_TAG, tuple(items))


def is_parts(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and value[0] == PARTS_TAG


def patch_entry(unit_key, value, strength: float) -> tuple:
    """The ComfyUI patch tuple ``(strength, value, strength_model, offset, function)`` for one unit."""
    offset, function = unit_offset(unit_key)
    return (strength, value, 1.0, offset, function)


def parts_patch_list(value, strength: float) -> list:
    """ComfyUI patch tuples of a parts bundle."""
    return [patch_entry(unit_key, part, strength) for unit_key, part in value[1]]


def unify_layouts(subject: dict, style: dict):
    """Return ``(subject_units, style_units, merged_weight_names)``.

    Unit dicts map unit keys to patch values; weights covered by both files in
    different layouts appear once, keyed by the weight name, with parts bundles.
    """
    by_weight_s, by_weight_t = defaultdict(list), defaultdict(list)
    for key in subject:
        by_weight_s[weight_name(key)].append(key)
    for key in style:
        by_weight_t[weight_name(key)].append(key)
    merged = [w for w in by_weight_s if w in by_weight_t and set(by_weight_s[w]) != set(by_weight_t[w])]
    if not merged:
        return dict(subject), dict(style), []
    merged_set = set(merged)

    def rebuild(patches, by_weight):
        out = {}
        for key, value in patches.items():
            name = weight_name(key)
            if name in merged_set:
                if name not in out:
                    out[name] = make_parts((k, patches[k]) for k in by_weight[name])
            else:
                out[key] = value
        return out

    return rebuild(subject, by_weight_s), rebuild(style, by_weight_t), merged


def expand(units: dict, keys) -> dict:
    """``{original patch key: value}`` for ``ModelPatcher.add_patches`` (parts bundles unpacked)."""
    out = {}
    for key in keys:
        value = units[key]
        if is_parts(value):
            out.update(dict(value[1]))
        else:
            out[key] = value
    return out
