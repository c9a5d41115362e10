# SPDX-License-Identifier: GPL-3.0-or-later
"""The bypass forward hooks: one per switched module, injected and ejected by ComfyUI.

:func:`install_bypass` registers one ``PatcherInjection`` with
``ModelPatcher.set_injections`` (0.3.75 and later): ComfyUI calls ``inject``
after loading the fused model and ``eject`` before unloading it (and whenever
another clone of the same model is loaded), so the base model never runs
with the hooks.  ``inject`` replaces each switched module's ``forward`` with a
:class:`SwitchedForward`: the original output plus the chosen side's
low-rank terms (:mod:`.bypass`).  Factors are copied to the compute device
and dtype at the first forward after a load and dropped at eject.  Several
K-LoRA Fuse nodes on one model stack their hooks and remove them in any order.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .bypass import Geometry, LowRankTerm, ModuleForm, module_at

logger = logging.getLogger(__name__)

#: ``ModelPatcher.set_injections`` key (several K-LoRA Fuse nodes append to one list).
BYPASS_INJECTION_KEY = "klora.fuse.bypass"

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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
                hook = SwitchedForward(module_at(model, path), form, self.tracker)
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
