"""The global balance factor gamma (docs/method.md, "Global balance gamma")."""
from __future__ import annotations

import math
from typing import Iterable, Mapping

from .errors import KLoRAError

#: Ratios at or above this multiple of the first mean are dropped as outliers.
OUTLIER_FACTOR = 3.0


def l1_ratio(subject_l1: float, style_l1: float) -> float | None:
    """``sum|dS| / sum|dT|`` for one weight; None when both deltas are zero there.

    A zero style delta against a non-zero subject delta gives ``inf``, which the
    outlier trimming then drops (``inf >= 3 * mean`` always holds).
    """
    if style_l1 == 0.0:
        return None if subject_l1 == 0.0 else math.inf
    return subject_l1 / style_l1


def compute_gamma(ratios: Iterable[float], subject_name: str = "subject", style_name: str = "style") -> float:
    """``mean(ratios)``, then the mean again over the ratios below ``3 * mean``.

    Raises KLoRAError instead of returning 0, infinity or NaN: when no ratio is
    given (no weight is covered by both LoRAs with a non-zero delta), when the
    subject is zero on every shared weight, or when the style is.
    """
    values = [float(r) for r in ratios]
    if not values:
        raise KLoRAError(
            f"gamma is undefined: no weight has a non-zero delta in both {subject_name} and {style_name}; "
            "check that both LoRAs target the same model and are not empty"
        )
    if any(math.isnan(v) for v in values):
        raise KLoRAError("gamma is undefined: a LoRA delta contains NaN values")
    first = sum(values) / len(values)
    kept = [v for v in values if v < OUTLIER_FACTOR * first]
    if math.isinf(first) and not kept:
        raise KLoRAError(
            f"gamma is undefined: the {style_name} LoRA is zero on every weight both LoRAs cover; "
            "the file is empty or was saved before training"
        )
    if not kept or first == 0.0:
        raise KLoRAError(
            f"gamma is undefined: the {subject_name} LoRA is zero on every weight both LoRAs cover; "
            "the file is empty or was saved before training"
        )
    gamma = sum(kept) / len(kept)
    if not math.isfinite(gamma) or gamma <= 0.0:
        raise KLoRAError(f"gamma is undefined (got {gamma!r}); the LoRA deltas are degenerate")
    return gamma


def trimming(ratios) -> tuple[float, int]:
    """``(first mean, number of ratios dropped as outliers)``, as :func:`compute_gamma` trims them."""
    values = [float(r) for r in ratios]
    first = sum(values) / len(values)
    return first, sum(1 for v in values if not v < OUTLIER_FACTOR * first)


def ratios_from_l1(l1: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Per-key ratios from ``{key: (subject_l1, style_l1)}``, skipping keys where both are zero."""
    out = {}
    for key, (s, t) in l1.items():
        r = l1_ratio(s, t)
        if r is not None:
            out[key] = r
    return out
