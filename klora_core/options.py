# SPDX-License-Identifier: GPL-3.0-or-later
"""Every option a K-LoRA user sets, defined once: its name, choices, range and default.

The K-LoRA Fuse node (``nodes/fuse_node.py``), the ``/klora/preview`` route
(``nodes/preview_params.py``) and the command line (``klora_core/cli``) all
read their choices, ranges and defaults from here, so they accept exactly the
same values and answer the same way to a bad one (tests/test_options.py holds
them to it).  No ComfyUI import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import KLoRAError
from .schedule import DEFAULTS, PATTERN_S, PATTERN_S_STAR, PATTERNS, check_pattern

__all__ = [
    "PATTERNS", "PATTERN_S", "PATTERN_S_STAR",
    "SCOPE_ATTENTION", "SCOPE_ALL", "SCOPES",
    "OUTSIDE_BOTH", "OUTSIDE_SUBJECT", "OUTSIDE_STYLE", "OUTSIDE_NONE", "OUTSIDE_CHOICES",
    "MEASURE_NOISE", "MEASURE_STEPS", "MEASURES", "CLI_SCOPES", "CLI_MEASURES",
    "MODE_AUTO", "MODE_BAKE", "MODE_BYPASS", "MODE_LIVE", "MODE_CHOICES", "RUN_MODES",
    "FLIP_CACHE_AUTO", "FLIP_CACHE_OFF", "FLIP_CACHE_ON", "FLIP_CACHES",
    "NumberRange", "STRENGTH", "ALPHA", "BETA", "BETA_PATTERN_DEFAULT", "STEPS", "pattern_beta", "resolve_beta", "check_choice", "check_schedule",
]

# ---- which weights K-LoRA switches ------------------------------------------------------------
SCOPE_ATTENTION = "attention projections"
SCOPE_ALL = "all shared weights"
SCOPES = (SCOPE_ATTENTION, SCOPE_ALL)

# ---- what happens to shared weights outside the scope -----------------------------------------
OUTSIDE_BOTH = "both"
OUTSIDE_SUBJECT = "subject"
OUTSIDE_STYLE = "style"
OUTSIDE_NONE = "none"
OUTSIDE_CHOICES = (OUTSIDE_BOTH, OUTSIDE_SUBJECT, OUTSIDE_STYLE, OUTSIDE_NONE)

# ---- how sampling progress p is measured (docs/method.md, "Progress") -------------------------
MEASURE_NOISE = "noise level"
MEASURE_STEPS = "step count"
MEASURES = (MEASURE_NOISE, MEASURE_STEPS)

# ---- kept variants: whether a flip swaps in a kept copy of the weight (docs/flips.md) ---------
FLIP_CACHE_AUTO = "auto"  # keep them when the device holding the weights has the memory free
FLIP_CACHE_OFF = "off"    # re-bake at every flip; memory as a plain LoRA merge
FLIP_CACHE_ON = "on"      # always keep them (extra memory = the switched weights' size)
FLIP_CACHES = (FLIP_CACHE_AUTO, FLIP_CACHE_OFF, FLIP_CACHE_ON)

# ---- how the per-step choice reaches the weights (docs/modes.md) -----------------------------
MODE_AUTO = "auto"
MODE_BAKE = "bake"
MODE_BYPASS = "bypass"
MODE_LIVE = "live"
#: What the K-LoRA Fuse node's ``mode`` input offers (auto picks one of the other three).
MODE_CHOICES = (MODE_AUTO, MODE_BAKE, MODE_BYPASS, MODE_LIVE)
#: The modes a fused model actually runs in.
RUN_MODES = (MODE_BAKE, MODE_BYPASS, MODE_LIVE)

#: Command-line spellings (``--scope attention``) of the node's combo values.
CLI_SCOPES = {"attention": SCOPE_ATTENTION, "all": SCOPE_ALL}
CLI_MEASURES = {"noise": MEASURE_NOISE, "steps": MEASURE_STEPS}


@dataclass(frozen=True)
class NumberRange:
    """A numeric option: inclusive ``[lo, hi]``, its default and the UI step."""

    lo: float
    hi: float
    default: float
    step: float
    integer: bool = False

    def check(self, name: str, value):
        """``value`` as a float (int when ``integer``) inside the range; else KLoRAError naming ``name``.

        Non-finite values (NaN, inf) are refused explicitly: NaN passes any
        ``lo <= x <= hi`` test written as two negated comparisons (ComfyUI's
        own min/max check is such a test).
        """
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KLoRAError(f"{name} must be a number, got {value!r}")
        if self.integer and (isinstance(value, float) and not value.is_integer()):
            raise KLoRAError(f"{name} must be a whole number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise KLoRAError(f"{name} must be a finite number, got {value!r}")
        if not self.lo <= value <= self.hi:
            raise KLoRAError(f"{name} must be between {self.lo:g} and {self.hi:g}, got {value:g}")
        return int(value) if self.integer else float(value)


#: LoRA strength: the factor on a delta whenever K-LoRA applies it (like LoraLoader's strength_model).
STRENGTH = NumberRange(-100.0, 100.0, 1.0, 0.01)
#: Slope of the style factor over progress (paper: 1.5).
ALPHA = NumberRange(0.0, 10.0, 1.5, 0.05)
#: Offset of the style factor.  The default is pattern ``s``'s paper value, 0.5; the paper's value for
#: ``s*`` is 1.275 (:data:`~klora_core.schedule.DEFAULTS`), and the frontend extension (web/klora.js)
#: switches between the two when the pattern changes.  Negative values are kept for workflows saved
#: with 0.1.0, where -1 (the default then) meant "the pattern's paper value": any negative beta still
#: means that (:func:`resolve_beta`), so those workflows run unchanged.
BETA = NumberRange(-1.0, 10.0, 0.5, 0.025)
#: The 0.1.0 sentinel: a beta below 0 means the pattern's paper value (what an omitted beta means).
BETA_PATTERN_DEFAULT = -1.0
#: Sampling steps (command line) and columns of the selection map (node, preview).
STEPS = NumberRange(1, 150, 20, 1, integer=True)


def pattern_beta(pattern: str) -> float:
    """The paper's beta for ``pattern``: 0.5 for ``s``, 1.275 for ``s*``."""
    return DEFAULTS[check_pattern(pattern)][1]


def resolve_beta(beta, pattern: str) -> float:
    """The beta actually used: the pattern's paper value when ``beta`` is None or negative (0.1.0's -1)."""
    return pattern_beta(pattern) if beta is None or beta < 0 else float(beta)


def check_choice(name: str, value, choices) -> str:
    """``value`` when it is one of ``choices``; else KLoRAError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise KLoRAError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_schedule(alpha, beta, pattern) -> tuple:
    """Validated ``(alpha, resolved beta, pattern)`` of a fuse request (node, preview or command line)."""
    pattern = check_choice("pattern", pattern, PATTERNS)
    alpha = ALPHA.check("alpha", alpha)
    beta = BETA.check("beta", BETA_PATTERN_DEFAULT if beta is None else beta)
    return alpha, resolve_beta(beta, pattern), pattern
