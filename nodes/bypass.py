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

The hooks are injected through ComfyUI's ``PatcherInjection`` /
``ModelPatcher.set_injections`` (0.3.75 and later): ComfyUI calls ``inject``
after loading the model and ``eject`` before unloading it (and whenever
another clone of the same model is loaded), so the base model never sees
them.  Factors are copied to the compute device and dtype once per load.
Design notes and the cost model: docs/modes.md.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..klora_core.weight_keys import display_key, weight_name
from .adapters import lora_factors
from .units import is_parts, unit_offset

logger = logging.getLogger(__name__)

#: ``ModelPatcher.set_injections`` key (several K-LoRA Fuse nodes append to one list).
BYPASS_INJECTION_KEY = "klora.fuse.bypass"

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
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


def _module_at(model, path: str):
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
        module = _module_at(model, name[: -len(".weight")]) if name.endswith(".weight") else None
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


def _prepared(term: LowRankTerm, device, dtype) -> LowRankTerm:
    """``term`` on ``device`` in ``dtype``, its scale folded into ``up`` (done once per load, not per forward)."""
    up = (term.up.to(device=device, dtype=torch.float32) * term.scale).to(dtype)
    mid = None if term.mid is None else term.mid.to(device=device, dtype=dtype)
    return LowRankTerm(up, term.down.to(device=device, dtype=dtype), mid, 1.0, term.rows)


def _delta(term: LowRankTerm, x, geometry: Geometry):
    """``up(mid(down(x)))`` of a prepared term: [..., rows] (linear) or [B, rows, ...] (conv)."""
    if geometry.conv_dim == 0:
        return F.linear(F.linear(x, term.down), term.up)
    conv = _CONV[geometry.conv_dim]
    args = (None, geometry.stride, geometry.padding, geometry.dilation)
    hidden = conv(x, term.down, *args) if term.mid is None else conv(conv(x, term.down), term.mid, *args)
    return conv(hidden, term.up)


def _add_term(out, x, term: LowRankTerm, geometry: Geometry):
    """``out`` with the term added on its rows; in place (without a full-size temporary) when possible."""
    channel = -1 if geometry.conv_dim == 0 else 1
    grad = torch.is_grad_enabled() and (out.requires_grad or x.requires_grad)
    if grad:  # keep autograd's view of ``out`` intact
        out = out.clone()
    target = out if term.rows is None else out.narrow(channel, term.rows[0], term.rows[1])
    if geometry.conv_dim == 0 and not grad and out.dtype == x.dtype:
        try:  # out[..., rows] += (x @ down^T) @ up^T as one in-place addmm on a 2-D view
            target.view(-1, target.shape[-1]).addmm_(F.linear(x, term.down).reshape(-1, term.down.shape[0]),
                                                     term.up.t())
            return out
        except RuntimeError:  # not viewable as 2-D: fall through
            pass
    target.add_(_delta(term, x, geometry).to(out.dtype))
    return out


class SwitchedForward:
    """Replaces one module's ``forward``: the original output plus the chosen side's low-rank terms.

    ``entries``: ``[(unit_key, subject terms, style terms)]`` (several units when
    a fused weight's slices switch independently).
    """

    def __init__(self, module, form: ModuleForm, tracker):
        self.module = module
        self.form = form
        self.tracker = tracker
        self.inner = None      # the forward we wrap (None: not hooked)
        self.previous = None   # the module's own ``forward`` attribute before us (None: its class's)
        self.active = False
        self._cache = {}       # (device, dtype) -> entries with prepared terms

    def hook(self) -> None:
        if self.inner is not None:
            return
        self.previous = self.module.__dict__.get("forward")
        self.inner = self.module.forward
        self.module.forward = self
        self.active = True

    def unhook(self) -> None:
        """Remove this hook, also when another K-LoRA hook was stacked on top of it later."""
        if self.inner is None:
            return
        current = self.module.__dict__.get("forward")
        if current is self:
            if self.previous is None:
                del self.module.forward
            else:
                self.module.forward = self.previous
        else:
            above = current
            while isinstance(above, SwitchedForward) and above.inner is not self:
                above = above.inner
            if not isinstance(above, SwitchedForward):
                # A foreign wrapper holds us: stay in its chain, as a pass-through.
                logger.debug("K-LoRA: %s is wrapped by another hook; leaving a pass-through", type(self.module))
                self.active = False
                self._cache.clear()
                return
            above.inner, above.previous = self.inner, (self.previous if above.previous is self else above.previous)
        self.inner = self.previous = None
        self.active = False
        self._cache.clear()

    def _entries(self, x):
        key = (x.device, x.dtype)
        entries = self._cache.get(key)
        if entries is None:
            entries = [(unit, [_prepared(t, x.device, x.dtype) for t in s_terms],
                        [_prepared(t, x.device, x.dtype) for t in t_terms])
                       for unit, s_terms, t_terms in self.form.entries]
            self._cache[key] = entries
        return entries

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if not self.active:
            return out
        x = args[0] if args else next(iter(kwargs.values()))
        uses_subject = self.tracker.uses_subject
        for unit, s_terms, t_terms in self._entries(x):
            for term in (s_terms if uses_subject(unit) else t_terms):
                out = _add_term(out, x, term, self.form.geometry)
        return out


class BypassInjection:
    """The inject / eject pair ComfyUI calls for one fused model (hooks per loaded model object)."""

    def __init__(self, forms: dict, tracker):
        self.forms = forms
        self.tracker = tracker
        self._hooks: dict = {}  # id(model) -> [SwitchedForward]

    def inject(self, model_patcher) -> None:
        model = model_patcher.model
        if id(model) in self._hooks:
            return
        hooks = []
        try:
            for path, form in self.forms.items():
                hook = SwitchedForward(_module_at(model, path), form, self.tracker)
                hook.hook()
                hooks.append(hook)
        except Exception:
            for hook in reversed(hooks):
                hook.unhook()
            raise
        self._hooks[id(model)] = hooks

    def eject(self, model_patcher) -> None:
        for hook in reversed(self._hooks.pop(id(model_patcher.model), [])):
            hook.unhook()

    def injected(self) -> int:
        """How many modules are hooked right now (for tests)."""
        return sum(len(h) for h in self._hooks.values())


def install_bypass(model_patcher, forms: dict, tracker) -> BypassInjection:
    """Register the bypass hooks of ``forms`` on ``model_patcher`` (a clone the caller owns)."""
    from comfy.patcher_extension import PatcherInjection

    injection = BypassInjection(forms, tracker)
    get = getattr(model_patcher, "get_injections", None)
    existing = list((get(BYPASS_INJECTION_KEY) if callable(get) else None) or [])
    model_patcher.set_injections(BYPASS_INJECTION_KEY,
                                 existing + [PatcherInjection(inject=injection.inject, eject=injection.eject)])
    return injection
