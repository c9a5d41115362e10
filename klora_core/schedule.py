"""The time-dependent style factor ``scale(p)`` of K-LoRA (docs/method.md, "The time-dependent style factor").

``p`` is the sampling progress in [0, 1): the fraction of the denoising schedule
already done (step ``i`` of a full ``N``-step run has ``p = i / N``).
"""
from __future__ import annotations

import math

#: Pattern names, as shown in the nodes and accepted by :func:`style_scale`.
PATTERN_S = "s"
PATTERN_S_STAR = "s*"
PATTERNS = (PATTERN_S, PATTERN_S_STAR)

#: The paper's defaults for each pattern: (alpha, beta).
#: ``s`` is the main-results pattern; ``s*`` is the supplement's, whose
#: beta = 0.85 * alpha = 1.275 matches the authors' scripts (the text says 1.3).
DEFAULTS = {
    PATTERN_S: (1.5, 0.5),
    PATTERN_S_STAR: (1.5, 1.275),
}


def check_pattern(pattern: str) -> str:
    if pattern not in PATTERNS:
        raise _error(f"unknown pattern {pattern!r}: expected one of {', '.join(repr(p) for p in PATTERNS)}")
    return pattern


def check_alpha_beta(alpha: float, beta: float) -> tuple[float, float]:
    """Validate the schedule parameters; return them as floats."""
    out = []
    for name, value in (("alpha", alpha), ("beta", beta)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise _error(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(value):
            raise _error(f"{name} must be finite, got {value!r}")
        out.append(value)
    return out[0], out[1]


def style_scale(progress: float, alpha: float, beta: float, pattern: str = PATTERN_S) -> float:
    """The style factor at ``progress`` (unitless, >= 0 for non-negative alpha/beta).

    - ``s``:  ``alpha * p + beta``
    - ``s*``: ``(alpha * p + beta) mod alpha``; with ``alpha == 0`` the modulo
      is undefined and the factor is the constant ``beta`` (no time dependence,
      like ``s`` with ``alpha == 0``).
    """
    check_pattern(pattern)
    value = alpha * progress + beta
    if pattern == PATTERN_S_STAR and alpha != 0:
        value = value % alpha
    return value


def step_progress(step: int, steps: int) -> float:
    """Progress of step ``step`` (0-based) in a full run of ``steps`` steps: ``step / steps``."""
    return step / steps


def _error(message: str) -> Exception:
    from .errors import KLoRAError

    return KLoRAError(message)
