# SPDX-License-Identifier: GPL-3.0-or-later
"""How a fused model's weights follow a flip: re-baked one by one, batched, or swapped (kept variants).

:class:`Rebaker` is called by :class:`~.patching.FuseRun` with the unit keys
whose choice just changed (at a sampling step, or at the restore after
sampling).  For every such weight ComfyUI has baked (it is in
``ModelPatcher.backup``) it makes the model hold ``W0 + chosen deltas``
exactly as ComfyUI computes it:

- ``REBAKE_ONE_BY_ONE``: ComfyUI's own path per weight (restore the original,
  ``ModelPatcher.patch_weight_to_device``).  The reference, and the fallback
  for every weight the batched path cannot reproduce bit for bit.
- ``REBAKE_BATCHED`` (default): all weights flipping together in
  :func:`~.batched_bake.bake_jobs` (equal-shape products in one bmm, fused
  adds, written in place: no allocation), identical to the last bit.
- kept variants (``flip_cache``, orthogonal to the two): see
  :mod:`.kept_variants`; ``auto`` keeps them when the free memory of the device
  holding the weights covers the switched weights' size beyond a reserve,
  decided at the first flip of every sampling pass.

Design notes and measurements: docs/flips.md, bench/README.md.
"""
from __future__ import annotations

import logging
import time

import torch


from ..klora_core.options import FLIP_CACHE_AUTO, FLIP_CACHE_OFF, FLIP_CACHE_ON, FLIP_CACHES
from ..klora_core.weight_keys import weight_name
from .batched_bake import bake_jobs, plan_job
from .patcher_backup import baked_names, put_original_back, put_weight
from .kept_variants import VariantStore, current_weight, reserve_bytes, should_keep, tensor_bytes
from .switch import KLoRASwitch

logger = logging.getLogger(__name__)

REBAKE_ONE_BY_ONE = "one by one"
REBAKE_BATCHED = "batched"
REBAKE_WAYS = (REBAKE_ONE_BY_ONE, REBAKE_BATCHED)

#: Float32 scratch for the deltas of one batch (bounds the extra memory of a batched flip).
CHUNK_BYTES = 128 * 1024 ** 2


def weight_state(patcher, name: str) -> tuple:
    """The choice of every K-LoRA switch on weight ``name``, in patch order (True = subject)."""
    return tuple(entry[1].control.tracker.uses_subject(entry[1].control.unit_key)
                 for entry in patcher.patches.get(name, ()) if isinstance(entry[1], KLoRASwitch))


def previous_state(patcher, name: str, tracker, toggled: set) -> tuple:
    """The state before the units in ``toggled`` (of ``tracker``) flipped."""
    return tuple(
        entry[1].control.tracker.uses_subject(entry[1].control.unit_key)
        ^ (entry[1].control.tracker is tracker and entry[1].control.unit_key in toggled)
        for entry in patcher.patches.get(name, ()) if isinstance(entry[1], KLoRASwitch))


def rebake_one(patcher, name: str) -> None:
    """ComfyUI's own path: put the original back, then ``patch_weight_to_device`` re-applies all patches."""
    device = current_weight(patcher, name).device
    put_original_back(patcher, name)
    patcher.patch_weight_to_device(name, device_to=device)


class FlipStats:
    """Counters since install (tests and benchmarks read them)."""

    def __init__(self):
        self.batched = 0       # weights re-baked by bake_jobs
        self.one_by_one = 0    # weights re-baked by ComfyUI's per-weight path
        self.swapped = 0       # flips served by a kept variant
        self.seconds = 0.0     # time inside Rebaker.rebake
        self.keep = None       # decision of the current / last pass (None: not decided yet)
        self.keep_reason = ""


class Rebaker:
    """Re-bakes flipped weights for one FuseRun (see module docstring).

    Args:
        tracker: the run's ChoiceTracker (to tell its switches from other runs').
        way: REBAKE_BATCHED or REBAKE_ONE_BY_ONE.
        flip_cache: FLIP_CACHE_AUTO / OFF / ON (klora_core.options).
        reserve: bytes to leave free when ``auto`` decides (None: ComfyUI's minimum
            inference memory + the model's estimate for the current input).
        chunk_bytes: float32 scratch per batch.
    """

    def __init__(self, tracker, way: str = REBAKE_BATCHED, flip_cache: str = FLIP_CACHE_AUTO, reserve=None,
                 chunk_bytes: int = CHUNK_BYTES):
        if way not in REBAKE_WAYS or flip_cache not in FLIP_CACHES:
            raise ValueError(f"unknown re-bake way {way!r} or flip_cache {flip_cache!r}")
        self.tracker = tracker
        self.way = way
        self.flip_cache = flip_cache
        self.reserve = reserve
        self.chunk_bytes = int(chunk_bytes)
        self.store = VariantStore()
        self.stats = FlipStats()
        self._inference_bytes = 0
        self._workspace = None
        self._logged_keep = None

    # ---- pass life cycle ------------------------------------------------------------------
    def begin_pass(self) -> None:
        """A sampling pass starts: decide about kept variants again at its first flip."""
        self.stats.keep = None

    def end_pass(self) -> None:
        """The pass ended (after the restore): free the scratch."""
        self._workspace = None

    def note_input(self, base_model, x) -> None:
        """Remember what the model needs for this input (``BaseModel.memory_required``), for the reserve."""
        if self.stats.keep is not None or self.reserve is not None:
            return
        try:
            self._inference_bytes = int(base_model.memory_required(list(x.shape)))
        except Exception:  # not every model class / version has it
            self._inference_bytes = 0

    def forget(self) -> None:
        """Drop kept variants and scratch (a flip or the restore failed: their labels cannot be trusted)."""
        self.store.clear()
        self._workspace = None

    # ---- the work -------------------------------------------------------------------------
    def rebake(self, patcher, unit_keys) -> int:
        """Make the model hold the current choice for the weights behind ``unit_keys``; return how many."""
        t0 = time.perf_counter()
        names = baked_names(patcher, (weight_name(k) for k in unit_keys))
        if not names:
            return 0  # offloaded (ComfyUI's LowVramPatch reads the switch live) or not loaded
        toggled = set(unit_keys)
        try:
            keep = self._keeping(patcher)
            pending = names
            if keep:
                pending = [n for n in names if not self.store.swap(patcher, n, weight_state(patcher, n))]
                self.stats.swapped += len(names) - len(pending)
            self._compute(patcher, pending, keep, toggled)
        except BaseException:
            self.forget()
            self.stats.keep, self.stats.keep_reason = False, "a flip failed in this pass"
            raise
        finally:
            self.stats.seconds += time.perf_counter() - t0
        return len(names)

    def _compute(self, patcher, names: list, keep: bool, toggled: set) -> None:
        old_states = {n: self.store.state_of_current(patcher, n, previous_state(patcher, n, self.tracker, toggled))
                      for n in names} if keep else {}
        jobs, targets, olds, fresh, fallback = [], [], [], [], []
        for name in names:
            old = current_weight(patcher, name)
            job = plan_job(patcher, name) if self.way == REBAKE_BATCHED else None
            if job is None:
                fallback.append((name, old))
                continue
            # In place (no allocation) unless the old tensor is kept or is the original itself.
            new = keep or old.data_ptr() == job.original.data_ptr()
            jobs.append(job)
            olds.append(old)
            fresh.append(new)
            targets.append(torch.empty_like(old, memory_format=torch.contiguous_format) if new else old.data)
        if jobs:
            bake_jobs(jobs, targets, self._workspace_for, self.chunk_bytes)
            for job, target, new in zip(jobs, targets, fresh):
                if new:
                    put_weight(patcher, job.name, target)  # in place: keeps ComfyUI's Parameter object
            self.stats.batched += len(jobs)
        for name, _ in fallback:
            rebake_one(patcher, name)
        self.stats.one_by_one += len(fallback)
        if keep:
            for name, old in [(j.name, o) for j, o in zip(jobs, olds)] + fallback:
                self.store.record(patcher, name, old, old_states[name], weight_state(patcher, name))

    def _workspace_for(self, device, numel: int) -> torch.Tensor:
        ws = self._workspace
        if ws is None or ws.device != torch.device(device) or ws.numel() < numel:
            self._workspace = ws = torch.empty(numel, dtype=torch.float32, device=device)
        return ws

    # ---- kept variants: on or off for this pass ------------------------------------------
    def _keeping(self, patcher) -> bool:
        if self.stats.keep is None:
            self.store.prune(patcher)
            keep, reason = self._decide(patcher)
            if not keep:
                self.store.clear()
            if keep != self._logged_keep:
                logger.info("K-LoRA flips: kept variants %s (%s)", "on" if keep else "off", reason)
                self._logged_keep = keep
            self.stats.keep, self.stats.keep_reason = keep, reason
        return self.stats.keep

    def _decide(self, patcher) -> tuple:
        if self.flip_cache == FLIP_CACHE_OFF:
            return False, "flip_cache off"
        if getattr(patcher, "weight_inplace_update", False):
            return False, "this model updates its weights in place, so there is no second tensor to swap in"
        if self.flip_cache == FLIP_CACHE_ON:
            return True, "flip_cache on"
        names = baked_names(patcher, (weight_name(k) for k in self.tracker.keys))
        if not names:
            return False, "no switched weight is baked on a device"
        weights = [current_weight(patcher, n) for n in names]
        device = weights[0].device
        required = sum(tensor_bytes(w) for n, w in zip(names, weights) if not self.store.has_spare(n))
        reserve = self.reserve if self.reserve is not None else reserve_bytes(self._inference_bytes)
        keep, free = should_keep(device, required, reserve)
        mib = 1024 ** 2
        return keep, (f"auto: {required / mib:.0f} MiB needed for {len(names)} switched weights, "
                      f"{free / mib:.0f} MiB free on {device}, {reserve / mib:.0f} MiB reserved")


def describe(flip_cache: str, switched_bytes: int, n_weights: int) -> str:
    """The Fuse report's line about flips."""
    size = f"{switched_bytes / 1024 ** 2:.0f} MiB"
    if flip_cache == FLIP_CACHE_ON:
        return f"flips: kept variants on (both baked versions of {n_weights} switched weights: +{size}); a flip is a swap"
    if flip_cache == FLIP_CACHE_OFF:
        return "flips: batched re-bakes (kept variants off); memory as a plain LoRA merge"
    return (f"flips: kept variants auto: on when the device holding the weights has {size} free beyond ComfyUI's "
            f"reserve (a flip is then a swap), else batched re-bakes; decided when sampling starts (see the log)")
