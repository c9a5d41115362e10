# SPDX-License-Identifier: GPL-3.0-or-later
"""The two loader nodes, "Load Subject LoRA" and "Load Style LoRA" (ComfyUI V3 node API).

Each reads one file from ComfyUI's ``loras`` folders into a
:class:`~.handles.LoRAHandle` (the project's one reader: safe loaders only)
and can apply the file's text-encoder part to a CLIP, as LoraLoader does.
Node ids, input names and output order are stored in every saved workflow:
never change them (tests/test_saved_workflows.py runs the workflows saved with 0.1.0).
"""
from __future__ import annotations

import logging

import comfy.lora
import comfy.lora_convert
import folder_paths
from comfy_api.latest import io

from ..klora_core import options
from ..klora_core.errors import KLoRAError
from ..klora_core.options import STRENGTH
from .handles import STYLE, SUBJECT, file_signature, make_handle
from .sockets import CATEGORY, StyleLoRA, SubjectLoRA

logger = logging.getLogger(__name__)


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


def _strength_input(name: str, tooltip: str, optional: bool = False):
    return io.Float.Input(name, default=STRENGTH.default, min=STRENGTH.lo, max=STRENGTH.hi, step=STRENGTH.step,
                          optional=optional, tooltip=tooltip)


class _LoRALoader(io.ComfyNode):
    """What both loaders share; a subclass sets the role, its socket and its words.

    (Not DESCRIPTION or CATEGORY: the V3 base class derives those names from the schema.)
    """

    ROLE = SUBJECT
    SOCKET = SubjectLoRA
    NODE_ID = ""
    DISPLAY_NAME = ""
    ABOUT = ""

    @classmethod
    def define_schema(cls) -> io.Schema:
        role = cls.ROLE
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description=cls.ABOUT,
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip=f"The {role} LoRA file, from ComfyUI's loras folder."),
                _strength_input("strength", f"Strength of the {role} delta on the diffusion model whenever K-LoRA "
                                            "chooses it (like LoraLoader's strength_model). The choice itself does "
                                            "not depend on it."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: apply the file's text-encoder part to this CLIP, as LoraLoader does "
                                      "(DreamBooth subject LoRAs often train it)."),
                _strength_input("strength_clip", "Strength of the text-encoder part (only used when CLIP is "
                                                 "connected).", optional=True),
            ],
            outputs=[
                cls.SOCKET.Output(role, display_name=role,
                                  tooltip=f"The {role} LoRA, for the {role} input of K-LoRA Fuse."),
                # Output ids must differ from input ids; the name users see stays "clip".
                io.Clip.Output("clip_out", display_name="clip",
                               tooltip="The CLIP with the file's text-encoder part applied (None when no CLIP is "
                                       "connected)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name):
        """Refuse a prompt naming a file that is not there before anything runs, on every ComfyUI version
        (0.3.75 does not check V3 combo values itself); the words are the ones execution would use."""
        try:
            _lora_path(lora_name, f"{cls.ROLE} LoRA '{lora_name}'")
        except KLoRAError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, lora_name, **_):
        """Changes whenever the file is replaced or rewritten, so a new file is read again."""
        try:
            return file_signature(folder_paths.get_full_path("loras", lora_name) or "")
        except Exception:
            return float("nan")  # never equal: run the node

    @classmethod
    def execute(cls, lora_name, strength, clip=None, strength_clip=STRENGTH.default) -> io.NodeOutput:
        label = f"{cls.ROLE} LoRA '{lora_name}'"
        strength = options.STRENGTH.check(f"{label}: strength", strength)
        strength_clip = options.STRENGTH.check(f"{label}: strength_clip", strength_clip)
        handle = make_handle(cls.ROLE, lora_name, _lora_path(lora_name, label), strength)
        if clip is not None:
            clip, _ = apply_clip_part(clip, handle.state_dict, strength_clip)
        return io.NodeOutput(handle, clip)


class KLoRASubjectLoader(_LoRALoader):
    ROLE = SUBJECT
    SOCKET = SubjectLoRA
    NODE_ID = "KLoRASubjectLoader"
    DISPLAY_NAME = "Load Subject LoRA"
    ABOUT = "Loads the LoRA that holds the subject (a pet, a person, an object) for K-LoRA Fuse."


class KLoRAStyleLoader(_LoRALoader):
    ROLE = STYLE
    SOCKET = StyleLoRA
    NODE_ID = "KLoRAStyleLoader"
    DISPLAY_NAME = "Load Style LoRA"
    ABOUT = "Loads the LoRA that holds the style (watercolor, a painter) for K-LoRA Fuse."
