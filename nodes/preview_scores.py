# SPDX-License-Identifier: GPL-3.0-or-later
"""Scores of a LoRA file pair for ``/klora/preview`` (nodes/routes.py): read, score, cache.

No model is needed: the two files are read with the project's one LoRA reader
(``klora_core.safe_load.load_tensors``, as the loader nodes and the command
line read them), grouped into ``{canonical module: (up, down)}`` by
``klora_core.lora_file.lora_modules`` and scored by ``klora_core.build_plan``.
Scores are computed once per pair of file *contents* (SHA-256) and scope, at
strength 1, and kept in a bounded LRU cache (:data:`CACHE_PAIRS`); strengths
and the schedule are applied afterwards, so dragging a slider never rescores.

One pair is scored at a time.  A request that needs scoring while another
pair is being scored raises :class:`PreviewBusy` at once (the route answers
503 "busy, retry"): no worker thread ever waits on the lock.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..klora_core.errors import KLoRAError
from .preview_params import SCOPE_ATTENTION, PreviewParams, PreviewRequestError

#: Pairs of files (x scope) whose scores are kept.
CACHE_PAIRS = 16


@dataclass(frozen=True)
class _Scored:
    """Scores of a file pair at strength 1 (one cache entry)."""

    details: dict  # {canonical module: WeightScore}, in natural model order
    subject_only: tuple
    style_only: tuple
    outside_scope: int  # shared diffusion-model modules outside the scope
    subject_modules: int
    style_modules: int


_CACHE: "OrderedDict[tuple, _Scored]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_SCORE_LOCK = threading.Lock()  # one scoring at a time (bounded memory: two files read at once)
_STATS = {"hits": 0, "misses": 0}


class PreviewBusy(Exception):
    """Another pair is being scored: answer 503 and let the client retry."""


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
        _STATS.update(hits=0, misses=0)


def cache_stats() -> dict:
    with _CACHE_LOCK:
        return {"entries": len(_CACHE), "capacity": CACHE_PAIRS, **_STATS}


def _full_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise PreviewRequestError(None, f"LoRA '{name}' was listed but cannot be found any more; refresh",
                                  kind="unknown_lora")
    return path


def _modules(path: str, label: str) -> dict:
    from ..klora_core.lora_file import lora_modules
    from ..klora_core.safe_load import load_tensors

    return lora_modules(load_tensors(path, label), 1.0, source=label)


def _score(subject_path: str, style_path: str, p: PreviewParams) -> _Scored:
    from ..klora_core.weight_keys import is_attention_name
    from ..klora_core.plan import build_plan

    subject = _modules(subject_path, f"subject LoRA '{p.subject}'")
    style = _modules(style_path, f"style LoRA '{p.style}'")
    # Text-encoder modules are never switched by the node (it patches the diffusion model only).
    subject = {k: v for k, v in subject.items() if not k.startswith(("te1_", "te2_"))}
    style = {k: v for k, v in style.items() if not k.startswith(("te1_", "te2_"))}
    shared = [k for k in subject if k in style]
    if not shared:
        raise KLoRAError(f"subject LoRA '{p.subject}' and style LoRA '{p.style}' share no diffusion-model "
                         "layer: they were trained for different models (or use names that cannot be paired)")
    if p.scope == SCOPE_ATTENTION:
        in_scope = [k for k in shared if is_attention_name(k)]
        if not in_scope:
            raise KLoRAError(f"the LoRAs share {len(shared)} layers but no attention projection; "
                             "set scope to 'all shared weights'")
    else:
        in_scope = shared
    kept = set(in_scope)
    plan = build_plan({k: subject[k] for k in in_scope}, {k: style[k] for k in in_scope})  # scores only; schedule later
    return _Scored(
        details=dict(plan.details),
        subject_only=tuple(k for k in subject if k not in style),
        style_only=tuple(k for k in style if k not in subject),
        outside_scope=len([k for k in shared if k not in kept]),
        subject_modules=len(subject),
        style_modules=len(style),
    )


def _cached(key: tuple):
    """The cached scores for ``key`` (then the most recently used entry, counted as a hit), or None."""
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            _STATS["hits"] += 1
        return hit


def scored_pair(p: PreviewParams):
    """``(_Scored, cache_hit)`` for the request's files and scope (strength-1 scores, cached)."""
    from .handles import content_sha256

    subject_path, style_path = _full_path(p.subject), _full_path(p.style)
    key = (content_sha256(subject_path), content_sha256(style_path), p.scope)
    hit = _cached(key)
    if hit is not None:
        return hit, True
    if not _SCORE_LOCK.acquire(blocking=False):  # never park a worker thread on the lock
        raise PreviewBusy()
    try:
        hit = _cached(key)  # computed by a concurrent request meanwhile?
        if hit is not None:
            return hit, True
        scored = _score(subject_path, style_path, p)
        with _CACHE_LOCK:
            _STATS["misses"] += 1
            _CACHE[key] = scored
            while len(_CACHE) > CACHE_PAIRS:
                _CACHE.popitem(last=False)
    finally:
        _SCORE_LOCK.release()
    return scored, False


def make_plan(p: PreviewParams):
    """``(plan or None, scored, cache_hit, notes)``; plan None when a strength is 0."""
    from ..klora_core.plan import plan_from_scores, scores_at_strengths

    scored, hit = scored_pair(p)
    notes = []
    if p.subject_strength == 0.0 or p.style_strength == 0.0:
        notes.append("one strength is 0: K-LoRA has nothing to balance, so every weight takes the other LoRA")
        return None, scored, hit, notes
    details = scores_at_strengths(scored.details, p.subject_strength, p.style_strength)
    plan = plan_from_scores(details, scored.subject_only, scored.style_only, p.alpha, p.resolved_beta, p.pattern)
    return plan, scored, hit, notes
