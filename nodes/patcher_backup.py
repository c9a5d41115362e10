# SPDX-License-Identifier: GPL-3.0-or-later
"""The one place that reads ``ModelPatcher.backup`` (ComfyUI's record of the unpatched weights).

ComfyUI fills ``backup[name]`` (a ``namedtuple`` with ``weight`` and
``inplace_update``) when it patches a weight on a device, and empties it when
it unpatches; a weight it keeps offloaded (lowvram) has no entry.  Re-baking
(nodes/rebake.py, nodes/batched_bake.py) and the adapters' original weight
(nodes/patching.py) go through here, so a change of that field in ComfyUI has
one place to fix (tests/test_comfy_contact.py holds every other module to it).
"""
from __future__ import annotations

from typing import Iterable, Optional

import comfy.model_patcher
import comfy.utils


def original_of(patcher, name: str) -> Optional[object]:
    """The unpatched weight ``name`` ComfyUI saved when it baked it, or None (not baked: offloaded or unloaded)."""
    entry = patcher.backup.get(name)
    return None if entry is None else entry.weight


def is_baked(patcher, name: str) -> bool:
    """True when ComfyUI has baked weight ``name`` on a device (it holds its original in ``backup``)."""
    return name in patcher.backup


def baked_names(patcher, names: Iterable[str]) -> list:
    """The names in ``names`` (order kept, duplicates dropped) that ComfyUI has baked."""
    return [n for n in dict.fromkeys(names) if n in patcher.backup]


def updates_in_place(patcher, name: str) -> bool:
    """True when ComfyUI patched ``name`` in place (the model keeps its Parameter object: copy into it)."""
    entry = patcher.backup.get(name)
    return bool(entry is not None and entry.inplace_update)


def put_weight(patcher, name: str, tensor) -> None:
    """Make ``tensor`` the model's weight ``name`` the way ComfyUI patched it: copied into the Parameter
    when ComfyUI patches it in place, else set as a new Parameter."""
    if updates_in_place(patcher, name):
        comfy.utils.copy_to_param(patcher.model, name, tensor)
    else:
        comfy.utils.set_attr_param(patcher.model, name, tensor)


def put_original_back(patcher, name: str) -> None:
    """Make the model hold the unpatched weight ``name`` again (it must be baked: :func:`is_baked`)."""
    put_weight(patcher, name, patcher.backup[name].weight)


def original_weight(model_patcher, name: str):
    """``(weight, convert_func)``: the unpatched weight ``name`` (from ``backup`` when ComfyUI has patched it
    in place) and the model's convert function for it (or None)."""
    weight, _, convert_func = comfy.model_patcher.get_key_weight(model_patcher.model, name)
    saved = original_of(model_patcher, name)
    return (saved if saved is not None else weight), convert_func
