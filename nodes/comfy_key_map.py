# SPDX-License-Identifier: GPL-3.0-or-later
"""Which model weight each tensor of a LoRA file belongs to (ComfyUI glue).

ComfyUI turns a LoRA file into patches with a *key map*
``{lora base name: model weight key}``, where the model weight key is either a
state-dict key such as ``"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"``
or a tuple ``(key, (dim, start, length))`` naming a slice of a fused weight
(FLUX's q/k/v inside ``img_attn.qkv``), or ``(key, None, function)``.
``comfy.lora.load_lora`` then looks for ``<base name><suffix>`` tensors
(``.lora_up.weight``, ``.lora_A.weight``, ``.lora.down.weight``, ...).

ComfyUI 0.3.75 (and current master) maps SD1.5/SDXL diffusers names only in
the old attention-processor spelling (``unet.<...>.attn1.processor.to_q``), so
files written by current diffusers/PEFT training scripts
(``unet.<...>.attn1.to_q.lora_A.weight``, ``...to_q.lora.down.weight``,
``base_model.model.<...>``) load ZERO attention tensors, silently. For FLUX it
maps ``transformer.<diffusers name>`` but not the bare or
``base_model.model.`` PEFT spellings. ``build_unet_key_map`` adds those names;
it never changes an entry ComfyUI already has.
"""
from __future__ import annotations

import inspect
import logging
from typing import NamedTuple

import comfy.lora
import comfy.model_base
import comfy.utils

try:  # comfy.lora_convert exists since late 2024; older versions had no conversion step.
    from comfy.lora_convert import convert_lora as _convert_lora
except ImportError:  # pragma: no cover - depends on the ComfyUI version
    _convert_lora = None

logger = logging.getLogger("klora.lora_keys")

#: Prefixes under which SD1.5/SDXL diffusers/PEFT files name UNet modules:
#: bare names (PEFT ``get_peft_model_state_dict`` of the UNet), ``unet.``
#: (diffusers ``save_lora_weights``), ``base_model.model.`` (a saved PeftModel),
#: and the nested spellings older PEFT reference scripts wrote.
UNET_DIFFUSERS_PREFIXES = ("", "unet.", "base_model.model.", "base_model.model.unet.", "unet.base_model.model.")
#: The same for FLUX transformer modules (``transformer.`` is ComfyUI's own).
FLUX_DIFFUSERS_PREFIXES = (
    "",
    "transformer.",
    "base_model.model.",
    "base_model.model.transformer.",
    "transformer.base_model.model.",
)

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


def _target_key(target) -> str:
    """State-dict key of a key-map value (a str, or a tuple whose first item is the key)."""
    return target if isinstance(target, str) else target[0]


def _unet_diffusers_names(model, model_keys: set) -> dict:
    """``{diffusers module name: model weight key}`` for an SD-style UNet (empty otherwise).

    From ``comfy.utils.unet_to_diffusers`` (``"down_blocks.0.resnets.0.conv1.weight"``
    -> ``"input_blocks.1.0.in_layers.2.weight"``), keeping ``to_out.0`` and
    without ComfyUI's ``.processor.`` rewrite, limited to weights the model has.
    """
    unet_config = getattr(model.model_config, "unet_config", {}) or {}
    out = {}
    for name, ldm in comfy.utils.unet_to_diffusers(unet_config).items():
        if not name.endswith(".weight"):
            continue
        target = "diffusion_model.{}".format(ldm)
        if target in model_keys:
            out[name[: -len(".weight")]] = target
    return out


def _flux_diffusers_names(model, model_keys: set) -> dict:
    """``{diffusers module name: key-map value}`` for FLUX-family models (empty otherwise).

    Values keep ComfyUI's form: ``(key, (0, start, length))`` for q/k/v/proj_mlp
    slices of a fused weight, ``(key, None, swap_scale_shift)`` for norm_out.
    """
    if not isinstance(model, comfy.model_base.Flux):
        return {}
    mapping = comfy.utils.flux_to_diffusers(model.model_config.unet_config, output_prefix="diffusion_model.")
    out = {}
    for name, target in mapping.items():
        if name.endswith(".weight") and _target_key(target) in model_keys:
            out[name[: -len(".weight")]] = target
    return out


def build_unet_key_map(model_patcher) -> dict:
    """Key map for the diffusion model of ``model_patcher``: ComfyUI's own plus modern names.

    Returns a fresh dict ``{lora base name: model key | (key, offset[, fn])}``:
    ``comfy.lora.model_lora_keys_unet`` (always given a new dict: its default
    argument is a shared mutable dict) extended with diffusers/PEFT names
    under UNET_DIFFUSERS_PREFIXES / FLUX_DIFFUSERS_PREFIXES. Entries ComfyUI
    already has are kept as they are.
    """
    model = model_patcher.model
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    model_keys = set(model.state_dict().keys())
    extra = [(UNET_DIFFUSERS_PREFIXES, _unet_diffusers_names(model, model_keys)),
             (FLUX_DIFFUSERS_PREFIXES, _flux_diffusers_names(model, model_keys))]
    added = 0
    for prefixes, names in extra:
        for name, target in names.items():
            for prefix in prefixes:
                key = prefix + name
                if key not in key_map:
                    key_map[key] = target
                    added += 1
    logger.debug("key map: %d entries (%d diffusers/PEFT names added)", len(key_map), added)
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


def load_lora_patches(lora_state_dict, model_patcher, clip=None) -> LoraPatches:
    """Parse a LoRA state dict into ComfyUI patches with the extended key map.

    ``lora_state_dict``: ``{name: tensor}`` as read from the file.
    ``model_patcher``: the diffusion ModelPatcher (or None for text encoder only);
    ``clip``: optional ``comfy.sd.CLIP`` whose text-encoder names are added, as
    ``comfy.sd.load_lora_for_models`` does (its patches land in the same dict;
    each patcher's ``add_patches`` ignores keys it does not own).
    Logs one summary line (never one per key).
    """
    key_map = build_unet_key_map(model_patcher) if model_patcher is not None else {}
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    sd = _convert_lora(lora_state_dict) if _convert_lora is not None else lora_state_dict
    matched, unmatched = count_matched_tensors(sd, key_map)
    patches = _load_lora_quietly(sd, key_map)
    if unmatched:
        logger.warning(
            "LoRA: %d of %d tensors match no model weight and are ignored (e.g. %s); %d weights patched",
            len(unmatched), len(sd), ", ".join(unmatched[:3]), len(patches),
        )
    else:
        logger.info("LoRA: all %d tensors matched, %d weights patched", len(sd), len(patches))
    return LoraPatches(patches, len(matched), len(unmatched), unmatched)
