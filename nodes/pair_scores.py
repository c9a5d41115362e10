"""Scores of a parsed LoRA pair inside ComfyUI, computed once and cached.

Low-rank pairs are scored together with the exact batched scorer
(:mod:`klora_core.batched`, on the model's load device); dense deltas (LoHa,
LoKr, DoRA, ...) one weight at a time so at most one is held.

The decision only needs, per shared weight, the top-K and L1 sums of both
deltas at strength 1; strengths and the schedule (alpha, beta, pattern) are
applied afterwards (:func:`klora_core.plan.scores_at_strengths`), so changing them never rescores.
Cache key: both files' content hashes (not names) plus the unit key.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from comfy.weight_adapter.base import WeightAdapterBase

from ..klora_core.errors import KLoRAError
from ..klora_core.weight_keys import display_key
from ..klora_core.plan import WeightScore
from ..klora_core.batched import batched_delta_stats
from ..klora_core.scoring import delta_shape2d, delta_stats
from .adapters import adapter_rank, dense_delta, factors_of
from .units import is_parts

logger = logging.getLogger(__name__)

#: LoRA pairs whose scores are kept (each entry: a few floats per weight).
SCORE_CACHE_PAIRS = 32
_SCORE_CACHE: "OrderedDict[tuple, dict]" = OrderedDict()


def clear_score_cache() -> None:
    _SCORE_CACHE.clear()


def score_cache_size() -> int:
    return len(_SCORE_CACHE)


def _delta_and_rank(value, unit_key, model_patcher, device, label):
    factors = factors_of(value)
    if factors is not None:
        up, down, scale, rank = factors
        # Rank agreement of up and down was checked for every LoRA patch by fuse._check_shapes.
        up2 = up.to(device=device, dtype=torch.float32).flatten(1) * scale
        down2 = down.to(device=device, dtype=torch.float32).flatten(1)
        return (up2, down2), rank
    if is_parts(value):
        dense = dense_delta(value, unit_key, model_patcher, device)
        rank = 0
        for part_key, part in value[1]:
            part_factors = factors_of(part)
            rank += part_factors[3] if part_factors is not None else adapter_rank(part, dense)
        return dense, rank
    if not isinstance(value, (WeightAdapterBase, tuple, list)):
        raise KLoRAError(f"{label}: layer {display_key(unit_key)}: unsupported patch type {type(value).__name__}")
    dense = dense_delta(value, unit_key, model_patcher, device)
    return dense, adapter_rank(value, dense)


def score_units(units, subject_patches, style_patches, model_patcher, subject, style, device=None, progress=None):
    """``{unit_key: WeightScore}`` at strength 1 for ``units`` (cached by file content).

    Args:
        units: shared unit keys to score.
        subject_patches, style_patches: ``{unit_key: patch value}`` from ComfyUI's LoRA parsing.
        subject, style: the LoRAHandles (for the cache key and error messages).
        device: where to score (default: the model's load device).
        progress: optional callback(done, total).
    """
    device = device if device is not None else model_patcher.load_device
    cache_key = (subject.sha256, style.sha256)
    cached = _SCORE_CACHE.get(cache_key)
    if cached is None:
        cached = {}
        _SCORE_CACHE[cache_key] = cached
        while len(_SCORE_CACHE) > SCORE_CACHE_PAIRS:
            _SCORE_CACHE.popitem(last=False)
    else:
        _SCORE_CACHE.move_to_end(cache_key)
    out = {}
    todo = [u for u in units if u not in cached]
    lowrank = []  # (unit, s_delta, t_delta, k, s_rank, t_rank): scored together below
    done = 0
    for unit in todo:
        s_delta, s_rank = _delta_and_rank(subject_patches[unit], unit, model_patcher, device, subject.label())
        t_delta, t_rank = _delta_and_rank(style_patches[unit], unit, model_patcher, device, style.label())
        s_shape = delta_shape2d(s_delta, display_key(unit))
        t_shape = delta_shape2d(t_delta, display_key(unit))
        if s_shape != t_shape:
            raise KLoRAError(
                f"layer {display_key(unit)}: the {subject.label()} delta is {s_shape[0]}x{s_shape[1]} but the "
                f"{style.label()} delta is {t_shape[0]}x{t_shape[1]}; the two files were trained for different models"
            )
        k = min(s_rank * t_rank, s_shape[0] * s_shape[1])
        if isinstance(s_delta, tuple) and isinstance(t_delta, tuple):
            lowrank.append((unit, s_delta, t_delta, k, s_rank, t_rank))
            continue
        # A dense delta (LoHa, LoKr, DoRA, ...) is already materialised: score it now, then drop it,
        # so at most one weight's dense delta is held.
        s_stats, t_stats = _score_one(unit, s_delta, t_delta, k, subject, style, device)
        cached[unit] = _weight_score(s_stats, t_stats, k, s_rank, t_rank)
        done += 1
        if progress is not None:
            progress(done, len(todo))
    if lowrank:
        for (unit, _, _, k, s_rank, t_rank), (s_stats, t_stats) in zip(
                lowrank, _score_lowrank(lowrank, subject, style, device, done, len(todo), progress)):
            cached[unit] = _weight_score(s_stats, t_stats, k, s_rank, t_rank)
    for unit in units:
        out[unit] = cached[unit]
    return out


def _weight_score(s_stats, t_stats, k, s_rank, t_rank) -> WeightScore:
    return WeightScore(subject_topk=s_stats.topk_sum, style_topk=t_stats.topk_sum, subject_l1=s_stats.l1,
                       style_l1=t_stats.l1, k=k, subject_rank=s_rank, style_rank=t_rank)


def _score_one(unit, s_delta, t_delta, k, subject, style, device):
    """Per-layer scores of one unit; errors name the layer and both files."""
    try:
        return delta_stats(s_delta, k, display_key(unit)), delta_stats(t_delta, k, display_key(unit))
    except KLoRAError as exc:
        raise KLoRAError(f"{subject.label()} / {style.label()}: {exc}") from None
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not _is_out_of_memory(exc):
            raise
        raise KLoRAError(
            f"out of memory while scoring layer {display_key(unit)} of {subject.label()} / {style.label()} "
            f"on {device}; free memory (or unload other models) and run again. Nothing was patched."
        ) from None


def _score_lowrank(lowrank, subject, style, device, done, total, progress):
    """``[(subject stats, style stats)]`` for low-rank units, batched (klora_core.batched: exact, faster
    on CPU).  Out of memory there falls back to the per-layer path, which needs less and names the layer."""
    items = []
    for unit, s_delta, t_delta, k, _, _ in lowrank:
        items.append((s_delta, k, display_key(unit)))
        items.append((t_delta, k, display_key(unit)))
    report = None
    if progress is not None:
        def report(finished, count):
            progress(done + finished * len(lowrank) // count, total)
    try:
        stats = batched_delta_stats(items, progress=report)
    except KLoRAError as exc:
        raise KLoRAError(f"{subject.label()} / {style.label()}: {exc}") from None
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        logger.info("K-LoRA: batched scoring ran out of memory on %s; scoring layer by layer", device)
        return [_score_one(unit, s, t, k, subject, style, device) for unit, s, t, k, _, _ in lowrank]
    return [(stats[2 * i], stats[2 * i + 1]) for i in range(len(lowrank))]


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
