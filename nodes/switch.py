"""The per-weight switch: a ComfyUI weight adapter that applies the currently chosen LoRA's patch.

One ``KLoRASwitch`` sits in ``ModelPatcher.patches[weight_key]`` for every
weight both LoRAs cover.  ComfyUI's ``comfy.lora.calculate_weight`` calls its
``calculate_weight`` whenever the weight is (re)computed: when the model is
patched, when :mod:`.patching` re-bakes a weight after its choice flipped, and
at every forward for weights ComfyUI keeps offloaded (lowvram), where the
switch is read live.  The choice comes from a shared
:class:`klora_core.tracker.ChoiceTracker`.
"""
from __future__ import annotations

import torch

import comfy.lora
from comfy.weight_adapter.base import WeightAdapterBase

from .units import is_parts, parts_patch_list


class SwitchControl:
    """What a switch needs besides the two patches: its unit key, the strengths, the shared tracker.

    Kept as one opaque object inside ``KLoRASwitch.weights`` because current
    ComfyUI may rebuild adapters as ``type(a)(a.loaded_keys, copied(a.weights))``
    (comfy/lora.py ``prefetch_prepared_value``), walking tuples, lists and tensors
    and passing any other object through unchanged.
    """

    __slots__ = ("unit_key", "subject_strength", "style_strength", "tracker")

    def __init__(self, unit_key, subject_strength: float, style_strength: float, tracker):
        self.unit_key = unit_key
        self.subject_strength = float(subject_strength)
        self.style_strength = float(style_strength)
        self.tracker = tracker


class KLoRASwitch(WeightAdapterBase):
    """Applies the subject patch (at the subject strength) or the style patch (at the style strength).

    ``weights = (control, subject, style)``: ``subject`` / ``style`` are the
    patch values ComfyUI's LoRA loader produced for this weight (a
    WeightAdapterBase such as LoRAAdapter, or a legacy tuple like
    ``("diff", (tensor,))``); ``control`` is a :class:`SwitchControl`.  The
    unit's offset and function are applied by ComfyUI before this is called
    (the patch entry carries them).  The layout of ``weights`` never changes
    with the choice.
    """

    name = "klora_switch"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def create(cls, unit_key, subject, style, subject_strength: float, style_strength: float, tracker):
        keys = set(getattr(subject, "loaded_keys", ())) | set(getattr(style, "loaded_keys", ()))
        return cls(keys, (SwitchControl(unit_key, subject_strength, style_strength, tracker), subject, style))

    @property
    def control(self) -> SwitchControl:
        return self.weights[0]

    def chosen(self):
        """(patch value, strength) applied right now."""
        control, subject, style = self.weights
        if control.tracker.uses_subject(control.unit_key):
            return subject, control.subject_strength
        return style, control.style_strength

    def calculate_shape(self, key):
        subject = self.weights[1]
        shape = getattr(subject, "calculate_shape", None)
        return shape(key) if shape is not None else None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        value, chosen_strength = self.chosen()
        chosen_strength *= strength
        if chosen_strength == 0.0:
            return weight
        if is_parts(value):  # one weight covered in a different layout by each file
            return comfy.lora.calculate_weight(parts_patch_list(value, chosen_strength), weight, key,
                                               intermediate_dtype=intermediate_dtype)
        if isinstance(value, WeightAdapterBase):
            return value.calculate_weight(weight, key, chosen_strength, strength_model, offset, function,
                                          intermediate_dtype, original_weight)
        # Legacy patch tuples: the weight is already narrowed to the unit, so no offset here.
        return comfy.lora.calculate_weight([(chosen_strength, value, 1.0, None, function)], weight, key,
                                           intermediate_dtype=intermediate_dtype)
