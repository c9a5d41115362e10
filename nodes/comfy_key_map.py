# SPDX-License-Identifier: GPL-3.0-or-later
"""Which model weight each tensor of a LoRA file belongs to (ComfyUI glue).

ComfyUI turns a LoRA file into patches with a *key map*
``{lora base name: model weight key}``, where the model weight key is either a
state-dict key such as ``"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"``
or a tuple ``(key, (dim, start, length))`` naming a slice of a fused weight
(FLUX's q/k/v inside ``img_attn.qkv``), or ``(key, None, function)``.
``comfy.lora.load_lora`` then looks for ``<base name><suffix>`` tensors
(``.lora_up.weight``, ``.lora_A.weight``, ``.lora.down.weight``, ...).

ComfyUI maps each family's own module names (``lora_unet_<path>``,
``diffusion_model.<path>``) and, for a few families, diffusers names.  Files
written by trainers that use the diffusers port of a model load ZERO tensors
there, silently: SD1.5/SDXL in current diffusers/PEFT spelling
(``unet.<...>.attn1.to_q.lora_A.weight``; ComfyUI knows only the old
``.processor.`` form), Wan (``transformer.blocks.0.attn1.to_q``), HunyuanVideo
(``transformer.transformer_blocks.0.attn.to_q``), LTX-Video, Lumina 2, Z-Image
in kohya spelling (``lora_unet_layers_0_attention_to_q``), and bare or
``base_model.model.`` PEFT names of any family.  ``build_unet_key_map`` adds
them (nodes/diffusers_names.py has the names); docs/families.md lists the
naming styles tested per family.

``load_lora_patches`` counts matched tensors as the ones ComfyUI's loader
actually reads (everything else is reported as unmatched), so the Fuse
report's counts hold for every naming style.
"""
from __future__ import annotations

import inspect
import logging
from typing import NamedTuple

import comfy.lora

from .diffusers_names import UNDERSCORED_PREFIXES, diffusers_module_names

try:  # comfy.lora_convert exists since late 2024; older versions had no conversion step.
    from comfy.lora_convert import convert_lora as _convert_lora
except ImportError:  # pragma: no cover - depends on the ComfyUI version
    _convert_lora = None

logger = logging.getLogger("klora.lora_keys")

#: Every tensor-name suffix ComfyUI 0.3.75 reads after a key-map base name.
#: Derived from ``comfy.lora.load_lora`` and ``Adapter.load`` in
#: ``comfy/weight_adapter/{lora,loha,lokr,glora,oft,boft}.py``;
#: tests/test_comfy_key_map.py re-derives it from the ComfyUI source in use.
LORA_TENSOR_SUFFIXES = tuple(
    sorted(
        {
            # comfy/lora.py load_lora
            ".alpha", ".dora_scale", ".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight",
            # weight_adapter/lora.py (kohya, old diffusers, PEFT, mochi, transformers, qwen)
            ".reshape_weight",
            ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight",
            "_lora.up.weight", "_lora.down.weight",
            ".lora_B.weight", ".lora_A.weight",
            ".lora.up.weight", ".lora.down.weight",
            ".lora_B", ".lora_A",
            ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
            ".lora_B.default.weight", ".lora_A.default.weight",
            # weight_adapter/loha.py
            ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
            # weight_adapter/lokr.py
            ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
            # weight_adapter/glora.py
            ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight",
            # weight_adapter/oft.py, boft.py
            ".oft_blocks", ".rescale",
        },
        key=lambda s: (-len(s), s),  # longest first: the most specific suffix wins
    )
)


class LoraPatches(NamedTuple):
    """Result of load_lora_patches.

    ``patches``: ``{model key or (key, offset[, function]): adapter}`` as
    ``comfy.lora.load_lora`` returns it (feed it to ``ModelPatcher.add_patches``).
    ``n_matched`` / ``n_unmatched``: file tensors that do / do not belong to a
    base name of the key map. ``unmatched_keys``: the latter, sorted.
    """

    patches: dict
    n_matched: int
    n_unmatched: int
    unmatched_keys: list


def _same_weight_other_slice(old, new) -> bool:
    """Both values are slices of the same fused weight, at different rows (see build_unet_key_map)."""
    return (isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new) == 2
            and old[0] == new[0] and old[1] != new[1])


def build_unet_key_map(model_patcher) -> dict:
    """Key map for the diffusion model of ``model_patcher``: ComfyUI's own plus the names trainers write.

    Returns a fresh dict ``{lora base name: model key | (key, offset[, fn])}``:
    ``comfy.lora.model_lora_keys_unet`` (always given a new dict: its default
    argument is a shared mutable dict) extended with every family's diffusers
    module names (nodes/diffusers_names.py) under the prefixes trainers use,
    and with ``.`` written as ``_`` after ``lora_unet_``, ``lora_transformer_``
    and ``lycoris_``.  Entries ComfyUI already has are kept as they are, with one
    exception: where ComfyUI maps a name to a slice of a fused weight that is
    not the slice the model's own widths give (ComfyUI 0.3.75-0.8.0 assume
    Lumina 2's grouped-query k/v as wide as q), the right slice replaces it.
    """
    model = model_patcher.model
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    model_keys = set(model.state_dict().keys())
    added = corrected = 0
    for prefixes, names in diffusers_module_names(model, model_keys):
        for name, target in names.items():
            keys = [prefix + name for prefix in prefixes]
            keys += [prefix + name.replace(".", "_") for prefix in UNDERSCORED_PREFIXES]
            for key in keys:
                old = key_map.get(key)
                if old is None:
                    key_map[key] = target
                    added += 1
                elif _same_weight_other_slice(old, target):
                    key_map[key] = target
                    corrected += 1
    if corrected:
        logger.info("key map: %d slices of fused weights corrected to the model's own widths", corrected)
    logger.debug("key map: %d entries (%d trainer names added)", len(key_map), added)
    return key_map


def count_matched_tensors(lora_state_dict, key_map) -> tuple:
    """Split a LoRA file's tensor names by whether they belong to a key-map base name.

    A name belongs when it is ``<base><suffix>`` with ``base`` in ``key_map``
    and ``suffix`` in LORA_TENSOR_SUFFIXES. This says which tensors ComfyUI
    can attach to a model weight; it does not check that a pair is complete.
    Returns ``(matched_keys: set[str], unmatched_keys: list[str] sorted)``.
    """
    matched = set()
    unmatched = []
    for name in lora_state_dict:
        for suffix in LORA_TENSOR_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in key_map:
                matched.add(name)
                break
        else:
            unmatched.append(name)
    unmatched.sort()
    return matched, unmatched


def _load_lora_quietly(lora_state_dict, key_map) -> dict:
    """``comfy.lora.load_lora`` without its one-warning-per-unknown-key logging."""
    params = inspect.signature(comfy.lora.load_lora).parameters
    if "log_missing" in params:
        return comfy.lora.load_lora(lora_state_dict, key_map, log_missing=False)
    # Older ComfyUI always logged each unknown key on the root logger; drop just
    # those records (we report one summary instead).
    root = logging.getLogger()
    quiet = _DropMissingKeyLines()
    root.addFilter(quiet)
    try:
        return comfy.lora.load_lora(lora_state_dict, key_map)
    finally:
        root.removeFilter(quiet)


class _DropMissingKeyLines(logging.Filter):
    """Filter out ComfyUI's per-key "lora key not loaded" warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("lora key not loaded")


class _ReadTracker(dict):
    """A state dict that records which tensors were read (``comfy.lora.load_lora`` reads what it loads)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def load_lora_patches(lora_state_dict, model_patcher, clip=None) -> LoraPatches:
    """Parse a LoRA state dict into ComfyUI patches with the extended key map.

    ``lora_state_dict``: ``{name: tensor}`` as read from the file.
    ``model_patcher``: the diffusion ModelPatcher (or None for text encoder only);
    ``clip``: optional ``comfy.sd.CLIP`` whose text-encoder names are added, as
    ``comfy.sd.load_lora_for_models`` does (its patches land in the same dict;
    each patcher's ``add_patches`` ignores keys it does not own).
    A tensor is matched when ComfyUI's loader reads it while building the
    patches; every other tensor is unmatched.  Logs one summary line (never one per key).
    """
    key_map = build_unet_key_map(model_patcher) if model_patcher is not None else {}
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    sd = _convert_lora(lora_state_dict) if _convert_lora is not None else lora_state_dict
    tracked = _ReadTracker(sd)
    patches = _load_lora_quietly(tracked, key_map)
    unmatched = sorted(k for k in tracked if k not in tracked.read)
    if unmatched:
        logger.warning(
            "LoRA: %d of %d tensors match no model weight and are ignored (e.g. %s); %d weights patched",
            len(unmatched), len(sd), ", ".join(unmatched[:3]), len(patches),
        )
    else:
        logger.info("LoRA: all %d tensors matched, %d weights patched", len(sd), len(patches))
    return LoraPatches(patches, len(tracked.read), len(unmatched), unmatched)
