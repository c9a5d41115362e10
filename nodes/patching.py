"""Everything K-LoRA does to a ModelPatcher, in one place.

How the per-layer, per-step choice reaches the weights (docs/architecture.md,
"6. Switch" to "8. Restore", and "Why switch by re-baking"):

1. :func:`install` puts one :class:`~.switch.KLoRASwitch` patch per shared
   weight into a *clone* of the user's model and registers two keyed wrappers.
   ComfyUI patches ("bakes") the weights as usual when it loads the model; the
   switches then read the step-0 choice.
2. ``APPLY_MODEL`` wrapper (every model evaluation): measure the progress, ask
   the tracker which weights changed their choice, and re-bake only those:
   restore the original from ``ModelPatcher.backup`` and call the public
   ``ModelPatcher.patch_weight_to_device``.  Weights ComfyUI keeps offloaded
   (lowvram) are not in ``backup``: their ``LowVramPatch`` reads the switch at
   every forward, so they need nothing.
3. ``OUTER_SAMPLE`` wrapper: in ``finally`` (finished, failed or interrupted)
   return every switch to its step-0 choice and re-bake what differs, so the
   loaded model again matches what ComfyUI believes it holds.  If that fails,
   all models are unloaded, which restores the originals from ``backup``.

No per-forward work when no choice changes; re-baking costs one weight patch
per flipped weight (at most two flips per weight per run for pattern ``s``).

``MODE_LIVE`` (fallback for patchers that cache patched weights, such as
current ComfyUI's dynamic VRAM mode without a non-dynamic delegate): no switch
patches; a ComfyUI weight wrapper per weight adds the currently chosen delta to
a copy of the weight at every forward.  Exact, but it pays the delta at every
forward like the authors' code.

Weights the host patches at every forward itself (GGUF-quantized weights under
ComfyUI-GGUF, see :mod:`.quantized`): their switches always go into the patch
list, which ComfyUI-GGUF applies at every forward, so the current choice is
read live there in both modes; they are never re-baked (``FuseRun.host_live``).

``MODE_BYPASS``: weights untouched (no switch in any patch list, host-patched
weights included); :mod:`.bypass_hooks` adds the chosen LoRA's low-rank term
to each switched module's output (the mode choice: :mod:`.modes`).
"""
from __future__ import annotations

import logging

import torch

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
from comfy.patcher_extension import WrappersMP

from ..klora_core.options import FLIP_CACHE_AUTO
from ..klora_core.weight_keys import weight_name
from ..klora_core.options import MODE_BAKE, MODE_BYPASS, MODE_LIVE, RUN_MODES as MODES  # noqa: F401 (re-exported)
from ..klora_core.tracker import ChoiceTracker
from .rebake import REBAKE_BATCHED, Rebaker
from .sampling_progress import MEASURE_NOISE, ProgressMeter, current_sigma
from .switch import KLoRASwitch
from .units import patch_entry

logger = logging.getLogger(__name__)

#: Keys our wrappers are registered under (several K-LoRA Fuse nodes may stack on one model).
OUTER_SAMPLE_KEY = "klora.fuse.outer_sample"
APPLY_MODEL_KEY = "klora.fuse.apply_model"


class FuseRun:
    """Per-fused-model state: the tracker, the progress meter of the current pass, counters.

    Shared by every clone made downstream of the K-LoRA Fuse node (ComfyUI
    copies wrapper lists and patch lists, not the objects in them).
    """

    def __init__(self, plan, measure: str = MEASURE_NOISE, mode: str = MODE_BAKE, host_live=frozenset(),
                 flip_cache: str = FLIP_CACHE_AUTO, rebake_way: str = REBAKE_BATCHED):
        self.plan = plan
        self.measure = measure
        self.mode = mode
        self.host_live = frozenset(host_live)  # weight names the host patches at every forward (GGUF)
        self.tracker = ChoiceTracker(plan, initial_progress=0.0)
        self.rebaker = Rebaker(self.tracker, rebake_way, flip_cache)  # nodes/rebake.py: how a flip reaches the weights
        self._meter = None
        self._meter_sigmas = None
        self.rebaked = 0  # weights re-baked since install (for tests and benchmarks)
        self.flip_events = 0

    # ---- wrappers -------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        patcher = getattr(guider, "model_patcher", None)
        self._meter = None
        self._meter_sigmas = None
        self.rebaker.begin_pass()
        try:
            return executor(*args, **kwargs)
        finally:
            self._meter = None
            self._meter_sigmas = None
            self.restore(patcher)
            self.rebaker.end_pass()

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        base_model = executor.class_obj
        patcher = getattr(base_model, "current_patcher", None)
        if patcher is not None:
            progress = self._progress(base_model, transformer_options, t)
            if progress is not None:
                changed = self.tracker.update(progress)
                if changed:
                    self.flip_events += 1
                    if self.mode == MODE_BAKE:
                        self.rebaker.note_input(base_model, x)
                        self.rebake(patcher, changed)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    # ---- helpers --------------------------------------------------------
    def _progress(self, base_model, transformer_options, t):
        sample_sigmas = transformer_options.get("sample_sigmas")
        if sample_sigmas is None:
            return None  # called outside a sampler: keep the current choice
        if self._meter is None or self._meter_sigmas is not sample_sigmas:
            self._meter = ProgressMeter(self.measure, base_model.model_sampling, sample_sigmas)
            self._meter_sigmas = sample_sigmas
        return self._meter(current_sigma(transformer_options, t))

    def rebake(self, patcher, unit_keys) -> int:
        """Make the baked weights behind ``unit_keys`` follow the current choice (nodes/rebake.py).

        Weights the host patches at every forward (``host_live``, GGUF) read the switch live: never re-baked."""
        own = [k for k in unit_keys if weight_name(k) not in self.host_live]
        count = self.rebaker.rebake(patcher, own) if own else 0
        self.rebaked += count
        return count

    def restore(self, patcher) -> None:
        """Return to the step-0 choice and re-bake what differs (never raises)."""
        changed = self.tracker.reset()
        if not changed or patcher is None or self.mode != MODE_BAKE:
            return
        try:
            self.rebake(patcher, changed)
        except Exception:
            logger.exception("K-LoRA: could not restore %d weights after sampling; unloading models so "
                             "ComfyUI restores the originals", len(changed))
            self.rebaker.forget()
            comfy.model_management.unload_all_models()


class LiveSwitches:
    """A ComfyUI weight wrapper (``weight_function``) applying one weight's switches at every forward.

    ``weight`` may be the module's own parameter (ComfyUI casts without
    copying when nothing changes), so the delta goes onto a copy.
    """

    def __init__(self, name: str, entries: list):
        self.name = name
        # Built once: the switches inside read the current choice at every call.
        self.patches = [patch_entry(unit, switch, 1.0) for unit, switch in entries]  # entries: [(unit_key, switch)]

    def __call__(self, weight):
        work = weight.to(torch.float32, copy=True)
        out = comfy.lora.calculate_weight(self.patches, work, self.name)
        return out.to(weight.dtype)


def install(model_patcher, run: FuseRun, switches: dict, strength: float = 1.0) -> None:
    """Add ``switches`` ({unit_key: KLoRASwitch}) to ``model_patcher`` and register ``run``'s wrappers.

    Bake mode: as patches.  Live mode: as weight wrappers.  Bypass mode: only the wrappers (the
    forward hooks come from :func:`nodes.bypass_hooks.install_bypass`).  ``model_patcher``
    must be a clone the caller owns.
    """
    model_sd = model_patcher.model_state_dict()
    missing = [k for k in switches if weight_name(k) not in model_sd]
    if missing:
        raise RuntimeError(f"K-LoRA: the model has no weight for {missing[:3]} (and {max(len(missing) - 3, 0)} more)")
    # The host applies its own patches live for these (and ignores weight wrappers there): patch list.
    host_live = {k: s for k, s in switches.items() if weight_name(k) in run.host_live}
    if run.mode == MODE_LIVE:
        by_weight: dict = {}
        for unit, switch in switches.items():
            if unit not in host_live:
                by_weight.setdefault(weight_name(unit), []).append((unit, switch))
        for name, entries in by_weight.items():
            model_patcher.add_weight_wrapper(name, LiveSwitches(name, entries))
        if host_live:
            model_patcher.add_patches(host_live, strength)
    elif run.mode == MODE_BAKE:
        model_patcher.add_patches(switches, strength)
    # MODE_BYPASS: neither patches nor weight wrappers; nodes/bypass_hooks.py injects the forward hooks.
    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, OUTER_SAMPLE_KEY, run.outer_sample)
    model_patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, APPLY_MODEL_KEY, run.apply_model)


def make_switches(plan_keys, subject_patches: dict, style_patches: dict, subject_strength: float,
                  style_strength: float, run: FuseRun) -> dict:
    """One switch per shared unit key."""
    return {
        key: KLoRASwitch.create(key, subject_patches[key], style_patches[key], subject_strength, style_strength,
                                run.tracker)
        for key in plan_keys
    }
