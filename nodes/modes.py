# SPDX-License-Identifier: GPL-3.0-or-later
"""Which mode a fused model runs in (bake, bypass or live) and on which patcher; the ``mode`` input.

``auto`` (the default):

1. some switched weight is GGUF-quantized (ComfyUI-GGUF dequantizes it and
   adds its patches as dense deltas at every forward) and every switched
   weight has a low-rank form on both sides: **bypass**, the low-rank term
   added at forward time instead of a dense delta;
2. the patcher is not dynamic (ComfyUI's classic patcher, every ComfyUI before
   dynamic VRAM): **bake**, re-baking weights when a choice flips (GGUF
   weights without a low-rank form: patched live by ComfyUI-GGUF);
3. dynamic VRAM and every switched weight has a low-rank form on both sides:
   **bypass** (:mod:`.bypass`), weights untouched, nothing reloaded;
4. dynamic VRAM and some weight has none (LoHa, LoKr, DoRA, dense diffs):
   **bake** on ComfyUI's non-dynamic delegate, asked for once per source model
   and remembered on it (:func:`non_dynamic_delegate`);
5. no delegate either: **live** (weight wrappers, delta added at every forward).

A forced mode (``bake`` / ``bypass`` / ``live``) that cannot run raises a
KLoRAError naming why, before anything is patched.  Feature-detected
throughout (``is_dynamic``, ``get_non_dynamic_delegate``, ``set_injections``);
the cost of each mode: docs/modes.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from ..klora_core.errors import KLoRAError
from ..klora_core.options import MODE_AUTO, MODE_BAKE, MODE_BYPASS, MODE_LIVE
from ..klora_core.weight_keys import weight_name
from .bypass import bypass_supported, forward_forms
from .quantized import host_patches_live

logger = logging.getLogger(__name__)

#: Our own attribute on the source ModelPatcher remembering its delegate (or why there is none).  An
#: attribute, not a module-level weak dictionary: the delegate references its source (``parent``), so
#: a weak-keyed cache would keep the source (and its model) alive forever; as an attribute the pair
#: is freed with the source.
DELEGATE_ATTR = "_klora_non_dynamic_delegate"

#: Why a mode was chosen, for the report's mode line (fuse._mode_line says what the mode does).
WHY_CLASSIC = "auto: ComfyUI's classic patcher, nothing to do on steps without a flip"
WHY_DYNAMIC_BYPASS = "auto: dynamic VRAM; no reload, no second copy of the model"
WHY_FORCED = "chosen by the mode input"
WHY_GGUF_BYPASS = ("auto: GGUF weights; bypass adds the low-rank term at forward instead of ComfyUI-GGUF "
                   "dequantizing and adding a dense delta at every forward")


@dataclass
class ModeChoice:
    """``patcher``: a fresh clone the fused model is built on; ``mode``: bake, bypass or live;
    ``reason``: why, for the report; ``forms``: bypass forward forms (bypass only)."""

    patcher: object
    mode: str
    reason: str
    forms: Optional[dict] = None


def is_dynamic(patcher) -> bool:
    """True for current ComfyUI's dynamic VRAM patcher (``ModelPatcherDynamic``); False where there is none."""
    check = getattr(patcher, "is_dynamic", None)
    if not callable(check):
        return False
    try:
        return bool(check())
    except Exception as exc:  # a third-party patcher with a broken is_dynamic: treat as classic
        logger.debug("is_dynamic() failed: %s", exc)
        return False


def _ask_for_delegate(source):
    getter = getattr(source, "get_non_dynamic_delegate", None)
    if not callable(getter):
        return None, "this ComfyUI offers no non-dynamic delegate"
    try:
        delegate = getter()
    except Exception as exc:  # e.g. "Cannot create non-dynamic delegate: cached_patcher_init is not initialized."
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    if delegate is None or is_dynamic(delegate):
        return None, "ComfyUI's delegate is dynamic too"
    return delegate, None


def non_dynamic_delegate(source):
    """``(delegate, None)`` or ``(None, why)``: ComfyUI's non-dynamic copy of ``source``.

    Asked for at most once per source object (a reload of the model in current
    ComfyUI), remembered on it, failures included; never on a throwaway clone.
    Callers must clone the delegate, never patch it.
    """
    cached = getattr(source, DELEGATE_ATTR, None)
    if cached is not None:
        return cached
    result = _ask_for_delegate(source)
    try:
        setattr(source, DELEGATE_ATTR, result)
    except Exception as exc:  # a patcher that refuses attributes: ask again next time
        logger.warning("K-LoRA: cannot remember the non-dynamic delegate on %s: %s", type(source).__name__, exc)
    return result


def _bypass_forms(source, units, subject_patches, style_patches, subject, style):
    if not bypass_supported(source):
        return None, "this ComfyUI cannot inject forward hooks (no ModelPatcher.set_injections)"
    return forward_forms(source.model, units, subject_patches, style_patches, subject, style)


def any_host_live(source, units) -> bool:
    """True when the host patches some switched weight at every forward (a GGUF-quantized weight)."""
    return any(host_patches_live(source, weight_name(unit)) for unit in units)


def _forced(source, requested, dynamic, units, subject_patches, style_patches, subject, style) -> ModeChoice:
    if requested == MODE_LIVE:
        return ModeChoice(source.clone(), MODE_LIVE, WHY_FORCED)
    if requested == MODE_BYPASS:
        forms, why = _bypass_forms(source, units, subject_patches, style_patches, subject, style)
        if forms is None:
            raise KLoRAError(f"mode 'bypass' needs a low-rank LoRA on every switched weight, but {why}; "
                             "choose mode 'auto' or 'bake'")
        return ModeChoice(source.clone(), MODE_BYPASS, WHY_FORCED, forms)
    if not dynamic:
        return ModeChoice(source.clone(), MODE_BAKE, WHY_FORCED)
    delegate, why = non_dynamic_delegate(source)
    if delegate is None:
        raise KLoRAError(f"mode 'bake' on a dynamic VRAM model needs ComfyUI's non-dynamic copy of it, which is "
                         f"unavailable ({why}); choose mode 'auto' or 'bypass'")
    return ModeChoice(delegate.clone(), MODE_BAKE, WHY_FORCED + "; on ComfyUI's non-dynamic copy of the dynamic VRAM "
                                                                "model")


def choose_mode(source, requested, units, subject_patches: dict, style_patches: dict, subject, style) -> ModeChoice:
    """The patcher and mode for a fused model built from ``source`` (never mutated).

    ``requested``: one of options.MODE_CHOICES; ``units``: the switched unit keys;
    ``subject`` / ``style``: the LoRA handles (labels and strengths for the bypass forms).
    """
    dynamic = is_dynamic(source)
    if requested != MODE_AUTO:
        return _forced(source, requested, dynamic, units, subject_patches, style_patches, subject, style)
    gguf = any_host_live(source, units)
    forms = blocker = None
    if gguf or dynamic:
        forms, blocker = _bypass_forms(source, units, subject_patches, style_patches, subject, style)
    if gguf and forms is not None:
        return ModeChoice(source.clone(), MODE_BYPASS, WHY_GGUF_BYPASS, forms)
    if not dynamic:
        reason = f"auto: GGUF weights, but {blocker} (no low-rank forward form)" if gguf else WHY_CLASSIC
        return ModeChoice(source.clone(), MODE_BAKE, reason)
    if forms is not None:
        return ModeChoice(source.clone(), MODE_BYPASS, WHY_DYNAMIC_BYPASS, forms)
    delegate, why = non_dynamic_delegate(source)
    if delegate is not None:
        return ModeChoice(delegate.clone(), MODE_BAKE,
                          f"auto: dynamic VRAM, but {blocker} (no low-rank forward form); on ComfyUI's non-dynamic "
                          "copy of the model, made once per model and reused")
    return ModeChoice(source.clone(), MODE_LIVE,
                      f"auto: dynamic VRAM, {blocker} (no low-rank forward form) and no non-dynamic copy ({why}); "
                      "exact but slower")
