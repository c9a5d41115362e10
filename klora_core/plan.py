"""``build_plan``: score a subject/style LoRA pair once, then answer "which delta at which step".

Inputs are ``{weight_key: delta}`` mappings where a delta is ``(up, down)``
(``up @ down`` is the already-scaled delta, conv factors flattened to 2-D) or a
dense tensor.  Keys present in both mappings are scored; keys in only one are
listed in ``subject_only`` / ``style_only`` (callers apply them as plain LoRAs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Union

import torch

from . import schedule
from .errors import KLoRAError
from .gamma import compute_gamma, ratios_from_l1
from .scoring import DEFAULT_BLOCK_ELEMENTS, Delta, delta_rank, delta_shape2d, delta_stats

RankSpec = Union[None, int, Mapping[str, int]]


@dataclass(frozen=True)
class WeightScore:
    """Scores of one weight both LoRAs cover (sums of absolute delta entries, float64)."""

    subject_topk: float  # T_S: sum of the K largest |dS|
    style_topk: float  # T_T: sum of the K largest |dT|
    subject_l1: float  # sum |dS|
    style_l1: float  # sum |dT|
    k: int  # K actually used (rank_S * rank_T capped at the element count)
    subject_rank: int
    style_rank: int


@dataclass(frozen=True)
class KLoRAPlan:
    """Scores of a LoRA pair plus a schedule; cheap to re-schedule with :meth:`with_schedule`.

    Attributes:
        gamma: global balance factor (unitless, > 0).
        details: ``{key: WeightScore}`` for the keys both LoRAs cover, in input order.
        subject_only / style_only: keys only one LoRA covers (apply them as a plain LoRA would).
        alpha, beta, pattern: the style-factor schedule.
        unswitched: display names of shared weights left outside the scope that look like
            attention projections (not switched; the report and the selection map flag them).
    """

    gamma: float
    details: Mapping[str, WeightScore]
    subject_only: tuple
    style_only: tuple
    alpha: float
    beta: float
    pattern: str
    ratios: Mapping[str, float] = field(default_factory=dict)
    unswitched: tuple = ()

    @property
    def scores(self) -> dict:
        """``{key: (T_subject, T_style)}`` for the keys both LoRAs cover."""
        return {k: (d.subject_topk, d.style_topk) for k, d in self.details.items()}

    @property
    def keys(self) -> tuple:
        return tuple(self.details)

    def with_schedule(self, alpha: Optional[float] = None, beta: Optional[float] = None, pattern: Optional[str] = None) -> "KLoRAPlan":
        """The same scores under another schedule (no rescoring)."""
        pattern = schedule.check_pattern(self.pattern if pattern is None else pattern)
        a, b = schedule.check_alpha_beta(self.alpha if alpha is None else alpha, self.beta if beta is None else beta)
        return replace(self, alpha=a, beta=b, pattern=pattern)

    def scale(self, progress: float) -> float:
        """The style factor at ``progress`` in [0, 1]."""
        return schedule.style_scale(progress, self.alpha, self.beta, self.pattern)

    def uses_subject(self, key: str, progress: float) -> bool:
        """True when weight ``key`` takes the subject delta at ``progress`` (``T_S / gamma > T_T * scale``)."""
        d = self.details[key]
        return d.subject_topk / self.gamma > d.style_topk * self.scale(progress)

    def choose(self, progress: float) -> dict:
        """``{key: True if subject}`` for every shared key at ``progress``."""
        scale = self.scale(progress)
        gamma = self.gamma
        return {k: d.subject_topk / gamma > d.style_topk * scale for k, d in self.details.items()}

    def selection(self, steps: int) -> dict:
        """``{key: [bool] * steps}``: True = subject delta at step ``i`` (progress ``i / steps``)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise KLoRAError(f"steps must be a positive integer, got {steps!r}")
        per_step = [self.choose(schedule.step_progress(i, steps)) for i in range(steps)]
        return {k: [c[k] for c in per_step] for k in self.details}


def _rank_for(spec: RankSpec, key: str, side: str) -> Optional[int]:
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        value = spec.get(key)
    else:
        value = spec
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KLoRAError(f"{side}_rank for weight {key!r} must be a positive integer, got {value!r}")
    return value


def _resolve_rank(delta: Delta, spec: RankSpec, key: str, side: str) -> int:
    """Rank of the delta: the factor's inner dimension, else the caller's ``<side>_rank``."""
    given = _rank_for(spec, key, side)
    inner = delta_rank(delta, key)
    if inner is not None:
        return given if given is not None else inner
    if given is None:
        raise KLoRAError(
            f"{side} delta for weight {key!r} is a dense tensor, which carries no rank: "
            f"pass {side}_rank=<int> (or a {{key: int}} mapping) to build_plan"
        )
    return given


def _split_ranked(deltas: Mapping, rank_spec: RankSpec, side: str):
    """Accept ``{key: (dense_tensor, rank)}`` values too: return plain deltas and a rank spec."""
    ranked = {k: v for k, v in deltas.items()
              if isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[0], torch.Tensor)
              and isinstance(v[1], int) and not isinstance(v[1], bool)}
    if not ranked:
        return deltas, rank_spec
    plain = {k: (v[0] if k in ranked else v) for k, v in deltas.items()}
    ranks = {}
    for key in deltas:
        given = _rank_for(rank_spec, key, side)
        if given is not None:
            ranks[key] = given
    ranks.update({k: v[1] for k, v in ranked.items()})
    return plain, ranks


def _schedule_args(alpha, beta, pattern):
    """Validated ``(alpha, beta, pattern)``; None takes the pattern's paper default."""
    pattern = schedule.check_pattern(pattern)
    default_alpha, default_beta = schedule.DEFAULTS[pattern]
    alpha, beta = schedule.check_alpha_beta(default_alpha if alpha is None else alpha,
                                            default_beta if beta is None else beta)
    return alpha, beta, pattern


def _pair_k(key, s_delta, t_delta, subject_rank, style_rank):
    """``(K, subject rank, style rank)`` of one shared weight, after checking both deltas have its shape."""
    s_shape, t_shape = delta_shape2d(s_delta, key), delta_shape2d(t_delta, key)
    if s_shape != t_shape:
        raise KLoRAError(
            f"weight {key!r}: subject delta is {s_shape[0]}x{s_shape[1]} but style delta is "
            f"{t_shape[0]}x{t_shape[1]} (rows x columns); the two LoRAs were trained for different models"
        )
    s_rank = _resolve_rank(s_delta, subject_rank, key, "subject")
    t_rank = _resolve_rank(t_delta, style_rank, key, "style")
    return min(s_rank * t_rank, s_shape[0] * s_shape[1]), s_rank, t_rank


def build_plan(
    subject: Mapping[str, Delta],
    style: Mapping[str, Delta],
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    pattern: str = schedule.PATTERN_S,
    *,
    subject_rank: RankSpec = None,
    style_rank: RankSpec = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    progress: Optional[Callable[[int, int], None]] = None,
    batched: bool = False,
) -> KLoRAPlan:
    """Score a subject/style LoRA pair and return a :class:`KLoRAPlan`.

    Args:
        subject, style: ``{weight_key: (up, down)}`` (``up @ down`` is the
            already-scaled delta; conv factors may keep their 4-D shapes and
            are flattened) or ``{weight_key: dense_delta_tensor}``.
        alpha, beta: schedule parameters; None takes the pattern's paper default
            (``s``: 1.5, 0.5; ``s*``: 1.5, 1.275).
        pattern: ``"s"`` or ``"s*"``.
        subject_rank, style_rank: the rank of dense deltas, which carry none
            (an int for all keys or a ``{key: int}`` mapping).  A dense delta
            may also carry its own rank as ``{key: (dense_tensor, rank)}``.
            For ``(up, down)`` deltas the rank is the inner dimension unless
            given here.
            K = subject_rank * style_rank per weight, capped at its element count.
        block_elements: most dense-delta entries held at once while scoring.
        progress: optional ``callback(done, total)`` called after each weight.
        batched: score weights of equal shape together with
            :func:`klora_core.batched.batched_delta_stats` (same scores, see
            there; faster on CPU; chunks hold at most
            ``min(block_elements, its device default)`` entries).  Progress is
            then reported as a share of the deltas scored, in weights.

    Scoring runs on the device of the given tensors, one weight at a time
    (or one group of equal-shaped weights at a time when ``batched``).
    """
    alpha, beta, pattern = _schedule_args(alpha, beta, pattern)
    subject, subject_rank = _split_ranked(subject, subject_rank, "subject")
    style, style_rank = _split_ranked(style, style_rank, "style")

    shared = [k for k in subject if k in style]
    subject_only = tuple(k for k in subject if k not in style)
    style_only = tuple(k for k in style if k not in subject)
    if not shared:
        raise KLoRAError(
            "no weight is covered by both LoRAs, so there is nothing to choose between; "
            "check that the subject and style LoRAs were trained for the same base model"
        )

    if batched:
        details = _batched_details(subject, style, shared, subject_rank, style_rank, block_elements, progress)
        return plan_from_scores(details, subject_only, style_only, alpha, beta, pattern)

    details = {}
    for index, key in enumerate(shared):
        s_delta, t_delta = subject[key], style[key]
        k, s_rank, t_rank = _pair_k(key, s_delta, t_delta, subject_rank, style_rank)
        s_stats = delta_stats(s_delta, k, key, block_elements)
        t_stats = delta_stats(t_delta, k, key, block_elements)
        details[key] = WeightScore(
            subject_topk=s_stats.topk_sum,
            style_topk=t_stats.topk_sum,
            subject_l1=s_stats.l1,
            style_l1=t_stats.l1,
            k=k,
            subject_rank=s_rank,
            style_rank=t_rank,
        )
        if progress is not None:
            progress(index + 1, len(shared))

    return plan_from_scores(details, subject_only, style_only, alpha, beta, pattern)


def _batched_details(subject, style, shared, subject_rank, style_rank, block_elements, progress) -> dict:
    """``{key: WeightScore}`` for ``shared`` via the batched scorer (same checks as the per-layer loop)."""
    from .batched import batched_delta_stats, default_block_elements

    items, meta = [], {}
    for key in shared:
        s_delta, t_delta = subject[key], style[key]
        k, s_rank, t_rank = _pair_k(key, s_delta, t_delta, subject_rank, style_rank)
        meta[key] = (k, s_rank, t_rank)
        items.append((s_delta, k, key))
        items.append((t_delta, k, key))
    device = _first_device(items)
    budget = min(int(block_elements), default_block_elements(device)) if device is not None else block_elements
    report = None
    if progress is not None:
        def report(done, total):
            progress(done * len(shared) // total, len(shared))
    stats = batched_delta_stats(items, block_elements=budget, progress=report)
    details = {}
    for i, key in enumerate(shared):
        k, s_rank, t_rank = meta[key]
        s_stats, t_stats = stats[2 * i], stats[2 * i + 1]
        details[key] = WeightScore(
            subject_topk=s_stats.topk_sum, style_topk=t_stats.topk_sum, subject_l1=s_stats.l1,
            style_l1=t_stats.l1, k=k, subject_rank=s_rank, style_rank=t_rank,
        )
    return details


def _first_device(items):
    for delta, _, _ in items:
        tensor = delta if hasattr(delta, "device") else delta[0]
        return tensor.device
    return None


def scores_at_strengths(details: Mapping, subject_strength: float, style_strength: float) -> dict:
    """Scores of deltas scaled by the LoRA strengths, from scores at strength 1.

    Every score is a sum of absolute entries, so it scales with ``|strength|``:
    scoring once at strength 1 and scaling here means a strength change never
    rescores.  ``details``: ``{key: WeightScore}``.
    """
    s, t = abs(subject_strength), abs(style_strength)
    return {
        key: replace(d, subject_topk=d.subject_topk * s, style_topk=d.style_topk * t,
                     subject_l1=d.subject_l1 * s, style_l1=d.style_l1 * t)
        for key, d in details.items()
    }


def plan_from_scores(details, subject_only=(), style_only=(), alpha=None, beta=None, pattern=schedule.PATTERN_S) -> KLoRAPlan:
    """Build a plan from already computed :class:`WeightScore` values (e.g. from a cache)."""
    alpha, beta, pattern = _schedule_args(alpha, beta, pattern)
    ratios = ratios_from_l1({k: (d.subject_l1, d.style_l1) for k, d in details.items()})
    gamma = compute_gamma(ratios.values())
    assert math.isfinite(gamma)
    return KLoRAPlan(
        gamma=gamma,
        details=dict(details),
        subject_only=tuple(subject_only),
        style_only=tuple(style_only),
        alpha=alpha,
        beta=beta,
        pattern=pattern,
        ratios=ratios,
    )
