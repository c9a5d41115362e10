# SPDX-License-Identifier: GPL-3.0-or-later
"""Kept variants: both baked versions of a switched weight stay in memory, so a flip is a swap.

A switched weight is baked in one *state* (the choice of every K-LoRA switch
on it) at a time.  When it flips, the tensor in the model is not overwritten:
it is kept as the weight's *spare*, labelled with its state, and the new state
is baked into a fresh tensor.  The next flip back to the spare's state (the
restore after sampling, every later image) puts the spare back into the model
(``comfy.utils.set_attr``) and keeps the other: no arithmetic, no memory
traffic.  Extra memory: one spare per switched weight, i.e. the switched
weights' size in their dtype on their device.

Validity: the store holds the installed tensor only through a weak
reference.  When ComfyUI unpatches, re-patches or partly unloads the weight,
it drops that tensor from the model, the tensor dies and its entry (with the
spare) is dropped at once: kept memory never outlives the baked model it
belongs to.  A spare is also only used while the model holds exactly the
installed tensor under the same patch list (``patches_uuid``); the store is
emptied after any failure during a flip.

Whether to keep variants at all (:func:`should_keep`) depends on the free
memory of the device holding the weights (``model_management.get_free_memory``).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.utils

logger = logging.getLogger(__name__)

#: Reserve kept free when ComfyUI does not say how much inference needs (older versions).
DEFAULT_RESERVE_BYTES = 1024 ** 3


@dataclass
class _Entry:
    installed: weakref.ref  # the tensor in the model (installed by this store, or found there)
    installed_state: tuple
    spare: Optional[torch.Tensor]
    spare_state: Optional[tuple]
    patches_uuid: object


def current_weight(patcher, name: str) -> torch.Tensor:
    return comfy.model_patcher.get_key_weight(patcher.model, name)[0]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class VariantStore:
    """Spare baked tensors of one fused model's switched weights, keyed by weight name."""

    def __init__(self):
        self._entries: dict = {}

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.spare is not None)

    def spare_bytes(self) -> int:
        return sum(tensor_bytes(e.spare) for e in self._entries.values() if e.spare is not None)

    def has_spare(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.spare is not None

    def clear(self) -> None:
        self._entries.clear()

    def _entry(self, name: str, installed: torch.Tensor, state: tuple, spare, spare_state, uuid) -> None:
        def dropped(ref, name=name):  # the model let go of the installed tensor: the spare is useless
            entry = self._entries.get(name)
            if entry is not None and entry.installed is ref:
                del self._entries[name]

        self._entries[name] = _Entry(weakref.ref(installed, dropped), state, spare, spare_state, uuid)

    def _valid(self, patcher, name: str) -> Optional[_Entry]:
        entry = self._entries.get(name)
        if entry is None:
            return None
        if current_weight(patcher, name) is not entry.installed() or \
                entry.patches_uuid != getattr(patcher, "patches_uuid", None):
            del self._entries[name]  # ComfyUI re-patched it since, or another patch list is loaded
            return None
        return entry

    def prune(self, patcher) -> None:
        """Drop every entry the model no longer holds."""
        for name in list(self._entries):
            self._valid(patcher, name)

    def swap(self, patcher, name: str, state: tuple) -> bool:
        """Put the spare baked in ``state`` into the model; False when there is none (nothing changed)."""
        entry = self._valid(patcher, name)
        if entry is None or entry.spare is None or entry.spare_state != state:
            return False
        out = entry.installed()  # a strong reference before the model lets go of it
        comfy.utils.set_attr(patcher.model, name, entry.spare)
        self._entry(name, entry.spare, state, out, entry.installed_state, entry.patches_uuid)
        return True

    def state_of_current(self, patcher, name: str, guess: tuple) -> tuple:
        """The state the model's tensor was baked in: known when this store installed it, else ``guess``."""
        entry = self._valid(patcher, name)
        return entry.installed_state if entry is not None else guess

    def record(self, patcher, name: str, old: torch.Tensor, old_state: tuple, new_state: tuple) -> None:
        """After a re-bake: ``old`` (baked in ``old_state``) becomes the spare, the model's tensor the installed."""
        installed = current_weight(patcher, name)
        if installed is old:  # written in place: nothing to keep
            self._entries.pop(name, None)
            return
        self._entry(name, installed, new_state, old, old_state, getattr(patcher, "patches_uuid", None))


def reserve_bytes(inference_bytes: int = 0) -> int:
    """Memory left free for inference: ComfyUI's minimum inference memory plus the model's own estimate."""
    minimum = getattr(comfy.model_management, "minimum_inference_memory", None)
    base = int(minimum()) if minimum is not None else DEFAULT_RESERVE_BYTES
    return base + int(inference_bytes)


def should_keep(device, required_bytes: int, reserve: int) -> tuple:
    """``(keep, free_bytes)``: keep variants when ``device`` has ``required_bytes`` free beyond ``reserve``."""
    free = int(comfy.model_management.get_free_memory(device))
    return free - required_bytes >= reserve, free
