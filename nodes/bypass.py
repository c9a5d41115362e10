# SPDX-License-Identifier: GPL-3.0-or-later
"""Bypass switching: switched weights stay untouched; the chosen LoRA is added to the module's output.

For a module ``f`` whose weight K-LoRA switches, the output becomes

    y = f(x) + s * up(mid(down(x)))        (on the unit's output rows only)

for each low-rank term of the side (subject or style) the shared
:class:`klora_core.tracker.ChoiceTracker` chooses right now, with
``s = strength * alpha / rank``.  A flip costs nothing: the next forward reads
the new choice.  Terms come from ComfyUI's LoRA adapters (plain LoRA, conv
LoRA, LoCon with a Tucker ``mid``); a fused weight's unit (FLUX's q, k, v
inside ``qkv``) adds to its rows only; a weight the two files cover in
different layouts (a *parts* bundle) adds one term per part.  Anything else
(LoHa, LoKr, DoRA, dense diffs, transform functions) has no cheap forward form:
:func:`forward_forms` names it and the mode choice (:mod:`.modes`) keeps bake.

This module says what can be bypassed and how (:func:`forward_forms`);
:mod:`.bypass_hooks` runs it.  Design notes and the cost model: docs/modes.md.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..klora_core.weight_keys import display_key, weight_name
from .adapters import lora_factors
from .units import is_parts, unit_offset

_ADAPTER_NAMES = {"loha": "a LoHa", "lokr": "a LoKr", "glora": "a GLoRA", "oft": "an OFT", "boft": "a BOFT"}


class Geometry(NamedTuple):
    """How a module maps x to y: ``conv_dim`` 0 = linear ([..., in] -> [..., out]), else a ConvNd."""

    conv_dim: int
    in_channels: int
    out_channels: int
    kernel: tuple = ()
    stride: tuple = ()
    padding: object = ()
    dilation: tuple = ()


class LowRankTerm(NamedTuple):
    """``scale * up(mid(down(x)))`` added to output channels ``rows`` = (start, length) (None: all).

    Linear: up [rows, r], down [r, in].  Conv: up [rows, r', 1...], down [r, in, *kernel]
    (or [r, in, 1...] with mid [r', r, *kernel], LoCon's Tucker form).
    """

    up: torch.Tensor
    down: torch.Tensor
    mid: Optional[torch.Tensor]
    scale: float
    rows: Optional[tuple]


class ModuleForm(NamedTuple):
    """Everything the hook of one module needs: its geometry and ``[(unit_key, subject terms, style terms)]``."""

    geometry: Geometry
    entries: list


def _ntuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def module_geometry(module):
    """``(Geometry, None)`` for a linear or (ungrouped, zero-padded) convolution module, else ``(None, why)``.

    Duck-typed on the attributes torch's modules carry: newer ComfyUI ops
    classes (quantized, mixed precision) do not always subclass torch.nn.Linear.
    """
    kernel = getattr(module, "kernel_size", None)
    if kernel is not None:
        n = len(_ntuple(kernel, 1))
        if getattr(module, "transposed", False) or getattr(module, "groups", 1) != 1:
            return None, "a transposed or grouped convolution"
        if getattr(module, "padding_mode", "zeros") != "zeros":
            return None, f"a convolution with padding_mode {module.padding_mode!r}"
        padding = module.padding if isinstance(getattr(module, "padding", 0), str) else _ntuple(module.padding, n)
        return Geometry(n, int(module.in_channels), int(module.out_channels), _ntuple(kernel, n),
                        _ntuple(module.stride, n), padding, _ntuple(module.dilation, n)), None
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return Geometry(0, int(module.in_features), int(module.out_features)), None
    return None, f"a {type(module).__name__} (neither a linear layer nor a convolution)"


def _describe(value) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return f"a dense '{value[0]}' patch"
    name = getattr(value, "name", None)
    return _ADAPTER_NAMES.get(name, f"a {name or type(value).__name__} patch")


def _lora_term(value, unit_key, strength: float, geometry: Geometry):
    """``(LowRankTerm, None)`` for a plain/conv/LoCon LoRA patch on ``unit_key``, else ``(None, why)``."""
    factors = lora_factors(value)
    if factors is None:
        return None, _describe(value)
    if factors.dora_scale is not None:
        return None, "a DoRA LoRA (its normalisation needs the whole weight)"
    if factors.reshape is not None:
        return None, "a LoRA that reshapes its weight"
    offset, function = unit_offset(unit_key)
    if function is not None:
        return None, "a patch with a transform function"
    if offset is not None and offset[0] != 0:
        return None, "a patch on a column slice"
    rows = None if offset is None else (int(offset[1]), int(offset[2]))
    n_rows = geometry.out_channels if rows is None else rows[1]
    up, down, mid = factors.up, factors.down, factors.mid
    rank = int(down.shape[0])
    scale = float(strength) * (1.0 if factors.alpha is None else float(factors.alpha) / rank)
    n = geometry.conv_dim
    inner = rank if mid is None else int(mid.shape[0])
    if up.numel() != n_rows * inner:
        return None, f"a LoRA whose up {tuple(up.shape)} does not fit {n_rows} output channels"
    if n == 0:
        if mid is not None or down.numel() != rank * geometry.in_channels:
            return None, "a LoRA whose factors do not fit this linear layer"
        return LowRankTerm(up.reshape(n_rows, rank), down.reshape(rank, -1), None, scale, rows), None
    ones = (1,) * n
    kernel_in = geometry.in_channels * (1 if mid is not None else int(torch.Size(geometry.kernel).numel()))
    if down.numel() != rank * kernel_in:
        return None, "a LoRA whose down factor does not fit this convolution"
    if mid is None:
        down = down.reshape(rank, geometry.in_channels, *geometry.kernel)
    else:
        # ComfyUI bakes a Tucker mid only for 2-D kernels, as a square [r, r, kh, kw] factor.
        if n != 2 or tuple(mid.shape) != (rank, rank, *geometry.kernel):
            return None, f"a LoCon whose mid {tuple(mid.shape)} ComfyUI cannot bake for this convolution"
        down = down.reshape(rank, geometry.in_channels, *ones)
    return LowRankTerm(up.reshape(n_rows, inner, *ones), down, mid, scale, rows), None


def lowrank_terms(unit_key, value, strength: float, geometry: Geometry):
    """``(terms, None)`` for a patch value (parts bundles: one term per part), else ``(None, why)``."""
    parts = value[1] if is_parts(value) else ((unit_key, value),)
    terms = []
    for part_key, part in parts:
        term, why = _lora_term(part, part_key, strength, geometry)
        if term is None:
            return None, why
        terms.append(term)
    return terms, None


def module_at(model, path: str):
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def bypass_supported(model_patcher) -> bool:
    """True when this ComfyUI lets a patcher inject forward hooks (``set_injections``, 0.3.75 and later)."""
    try:
        from comfy.patcher_extension import PatcherInjection  # noqa: F401
    except ImportError:
        return False
    return callable(getattr(model_patcher, "set_injections", None))


def forward_forms(model, units, subject_patches: dict, style_patches: dict, subject, style):
    """``({module path: ModuleForm}, None)`` when every unit has a low-rank form on both sides.

    Otherwise ``(None, why)``, ``why`` naming the file and the layer (the first unit without one).
    ``subject`` / ``style``: the LoRA handles (label and strength).
    """
    forms: dict = {}
    for unit in units:
        name = weight_name(unit)
        module = module_at(model, name[: -len(".weight")]) if name.endswith(".weight") else None
        if module is None:
            return None, f"layer {display_key(unit)} is not the weight of a module"
        geometry, why = module_geometry(module)
        if geometry is None:
            return None, f"layer {display_key(unit)} is {why}"
        sides = []
        for handle, patches in ((subject, subject_patches), (style, style_patches)):
            terms, why = lowrank_terms(unit, patches[unit], handle.strength, geometry)
            if terms is None:
                return None, f"{handle.label()}: layer {display_key(unit)} is {why}"
            sides.append(terms)
        path = name[: -len(".weight")]
        forms.setdefault(path, ModuleForm(geometry, [])).entries.append((unit, sides[0], sides[1]))
    return forms, None
