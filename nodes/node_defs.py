"""The three ComfyUI nodes (V1 node API, which every ComfyUI since 2023 loads).

Node ids are part of every saved workflow: never rename them.
"""
from __future__ import annotations

import logging

import comfy.lora
import comfy.lora_convert
import folder_paths

from ..klora_core import options, schedule
from ..klora_core.errors import KLoRAError
from ..klora_core.options import (ALPHA, BETA, MEASURE_NOISE, MEASURES, OUTSIDE_BOTH, OUTSIDE_CHOICES,
                                  SCOPE_ATTENTION, SCOPES, STEPS, STRENGTH)
from .fuse import fuse_model
from .handles import STYLE, SUBJECT, file_signature, make_handle
from .selection_map import selection_map_outputs

logger = logging.getLogger(__name__)

CATEGORY = "loaders/K-LoRA"
SUBJECT_TYPE = "KLORA_SUBJECT"
STYLE_TYPE = "KLORA_STYLE"


def _lora_path(name: str, label: str) -> str:
    if name not in folder_paths.get_filename_list("loras"):
        raise KLoRAError(f"{label}: '{name}' is not in ComfyUI's loras folders; put the file there and refresh")
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise KLoRAError(f"{label}: '{name}' was not found in ComfyUI's loras folders")
    return path


def apply_clip_part(clip, state_dict: dict, strength: float):
    """Apply the text-encoder tensors of a LoRA file to ``clip`` the way LoraLoader does."""
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    prefixes = tuple(key_map)
    clip_part = {k: v for k, v in state_dict.items() if k.startswith(prefixes)}
    if not clip_part or strength == 0.0:
        return clip, 0
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(clip_part), key_map)
    new_clip = clip.clone()
    applied = new_clip.add_patches(loaded, strength)
    return new_clip, len(applied)


class _LoRALoaderBase:
    ROLE = SUBJECT
    OUTPUT_TYPE = SUBJECT_TYPE

    @classmethod
    def INPUT_TYPES(cls):
        role = cls.ROLE
        return {
            "required": {
                "lora_name": (folder_paths.get_filename_list("loras"), {
                    "tooltip": f"The {role} LoRA file, from ComfyUI's loras folder."}),
                "strength": ("FLOAT", {
                    "default": STRENGTH.default, "min": STRENGTH.lo, "max": STRENGTH.hi, "step": STRENGTH.step,
                    "tooltip": f"Strength of the {role} delta on the diffusion model whenever K-LoRA chooses it "
                               "(like LoraLoader's strength_model). The choice itself does not depend on it."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional: apply the file's text-encoder part to this CLIP, as "
                                             "LoraLoader does (DreamBooth subject LoRAs often train it)."}),
                "strength_clip": ("FLOAT", {
                    "default": STRENGTH.default, "min": STRENGTH.lo, "max": STRENGTH.hi, "step": STRENGTH.step,
                    "tooltip": "Strength of the text-encoder part (only used when CLIP is connected)."}),
            },
        }

    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, lora_name, strength, clip=None, strength_clip=1.0):
        try:
            return file_signature(folder_paths.get_full_path("loras", lora_name) or "")
        except Exception:
            return float("nan")

    def load(self, lora_name, strength, clip=None, strength_clip=1.0):
        label = f"{self.ROLE} LoRA '{lora_name}'"
        strength = options.STRENGTH.check(f"{label}: strength", strength)
        strength_clip = options.STRENGTH.check(f"{label}: strength_clip", strength_clip)
        handle = make_handle(self.ROLE, lora_name, _lora_path(lora_name, label), strength)
        if clip is not None:
            clip, _ = apply_clip_part(clip, handle.state_dict, strength_clip)
        return (handle, clip)


class KLoRASubjectLoader(_LoRALoaderBase):
    ROLE = SUBJECT
    RETURN_TYPES = (SUBJECT_TYPE, "CLIP")
    RETURN_NAMES = ("subject", "clip")
    OUTPUT_TOOLTIPS = ("The subject LoRA, for the subject input of K-LoRA Fuse.",
                       "The CLIP with the file's text-encoder part applied (None when no CLIP is connected).")
    DESCRIPTION = "Loads the LoRA that holds the subject (a pet, a person, an object) for K-LoRA Fuse."


class KLoRAStyleLoader(_LoRALoaderBase):
    ROLE = STYLE
    RETURN_TYPES = (STYLE_TYPE, "CLIP")
    RETURN_NAMES = ("style", "clip")
    OUTPUT_TOOLTIPS = ("The style LoRA, for the style input of K-LoRA Fuse.",
                       "The CLIP with the file's text-encoder part applied (None when no CLIP is connected).")
    DESCRIPTION = "Loads the LoRA that holds the style (watercolor, a painter) for K-LoRA Fuse."


class KLoRAFuse:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the two LoRAs to."}),
                "subject": (SUBJECT_TYPE, {"tooltip": "From 'Load Subject LoRA'."}),
                "style": (STYLE_TYPE, {"tooltip": "From 'Load Style LoRA'."}),
                "pattern": (list(schedule.PATTERNS), {
                    "default": schedule.PATTERN_S,
                    "tooltip": "How the style factor changes over sampling. 's' (paper's main results): "
                               "alpha*p+beta, subject early, style late. 's*' (paper's supplement, recommended "
                               "for FLUX): (alpha*p+beta) mod alpha, style first ~15%, then subject, then style."}),
                "alpha": ("FLOAT", {
                    "default": ALPHA.default, "min": ALPHA.lo, "max": ALPHA.hi, "step": ALPHA.step,
                    "tooltip": "Slope of the style factor over progress p (paper: 1.5). Higher favours the style "
                               "later in sampling; 0 removes the time dependence."}),
                "beta": ("FLOAT", {
                    "default": BETA.default, "min": BETA.lo, "max": BETA.hi, "step": BETA.step,
                    "tooltip": "Offset of the style factor. Higher favours the style. Paper values: 0.5 for s, "
                               "1.275 for s* (the pack's frontend switches between them with the pattern). "
                               "A negative value (0.1.0 workflows: -1) means the pattern's paper value. "
                               "alpha = beta = 0 selects the subject everywhere."}),
                "scope": (list(SCOPES), {
                    "default": SCOPE_ATTENTION,
                    "tooltip": "Which weights K-LoRA switches: the attention projections (q, k, v, out) as in "
                               "the paper, or every weight both LoRAs cover."}),
                "outside_scope": (list(OUTSIDE_CHOICES), {
                    "default": OUTSIDE_BOTH,
                    "tooltip": "Weights both LoRAs cover but outside the scope: apply both (like two "
                               "LoraLoaders), only the subject, only the style, or none (the authors' code)."}),
                "progress_measure": (list(MEASURES), {
                    "default": MEASURE_NOISE,
                    "tooltip": "How sampling progress p is measured: by noise level (exact fraction of the "
                               "schedule; right for img2img, split samplers, any scheduler) or by counting "
                               "steps within each sampling pass."}),
            },
            "optional": {
                "map_steps": ("INT", {
                    "default": STEPS.default, "min": STEPS.lo, "max": STEPS.hi,
                    "tooltip": "Columns of the selection map. The pack's frontend keeps it at the steps of the "
                               "KSampler this node feeds; set it to override. Only the picture uses it; sampling "
                               "follows the sampler's real progress."}),
                "mode": (list(options.MODE_CHOICES), {
                    "default": options.MODE_AUTO, "advanced": True,
                    "tooltip": "How the chosen LoRA reaches each weight. auto: bake on ComfyUI's classic patcher, "
                               "bypass with dynamic VRAM. bake: re-bake weights when a choice flips (no cost per "
                               "step). bypass: weights untouched, the LoRA is added at forward time (plain and conv "
                               "LoRAs only). live: delta added at every forward (slowest). The report says which "
                               "ran and why."}),
            },
        }

    RETURN_TYPES = ("MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "report", "selection_map")
    OUTPUT_TOOLTIPS = ("The model with K-LoRA applied during sampling.",
                       "gamma, how many weights take which LoRA at the first and last step, and which "
                       "weights only one LoRA covers.",
                       "Which LoRA each weight (rows, model order) uses at each step (columns): blue = subject, "
                       "orange = style.")
    FUNCTION = "fuse"
    CATEGORY = CATEGORY
    DESCRIPTION = ("K-LoRA (CVPR 2025): for every attention weight and every sampling step, applies exactly "
                   "one of the two LoRAs, chosen by its top-K magnitude, a global balance and a step-dependent "
                   "style factor. No training.")

    def fuse(self, model, subject, style, pattern, alpha, beta, scope, outside_scope, progress_measure,
             map_steps=STEPS.default, mode=options.MODE_AUTO):
        result = fuse_model(model, subject, style, alpha=alpha, beta=beta, pattern=pattern, scope=scope,
                            outside_scope=outside_scope, progress_measure=progress_measure, mode=mode)
        map_steps = options.STEPS.check("map_steps", map_steps)
        image, ui_image = selection_map_outputs(result.plan, map_steps)
        ui = {"text": [result.report]}
        if ui_image is not None:
            ui["images"] = [ui_image]
        return {"ui": ui, "result": (result.model, result.report, image)}


NODE_CLASS_MAPPINGS = {
    "KLoRASubjectLoader": KLoRASubjectLoader,
    "KLoRAStyleLoader": KLoRAStyleLoader,
    "KLoRAFuse": KLoRAFuse,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KLoRASubjectLoader": "Load Subject LoRA",
    "KLoRAStyleLoader": "Load Style LoRA",
    "KLoRAFuse": "K-LoRA Fuse",
}
