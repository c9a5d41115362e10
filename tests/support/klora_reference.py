# SPDX-License-Identifier: GPL-3.0-or-later
"""A deliberately plain reference implementation of K-LoRA, written from the
method's description only (docs/method.md), used by the tests to check ``klora_core``.

Nothing here is clever or fast:

- every delta is built densely in float64 (inputs of any dtype are upcast
  first, so float16/bfloat16 factors are multiplied exactly);
- ``T = sum of the K largest |delta|`` is computed with a FULL descending sort
  of all absolute elements, ``K = rank_S * rank_T`` capped at the element count;
- ``ratio = sum|dS| / sum|dT|``; ``gamma = mean(ratios)``, drop every ratio
  ``>= 3 * gamma``, mean again;
- ``scale(p) = alpha * p + beta`` (pattern ``s``) or
  ``(alpha * p + beta) mod alpha`` (pattern ``s*``), with ``p = i / N``;
- step ``i`` uses the subject delta iff ``TS / gamma > TT * scale(p)``
  (strictly greater: ties go to style).

Conventions that the paper leaves open and that docs/method.md documents (mirrored
here so the two can be compared):

- pattern ``s*`` with ``alpha == 0`` has the constant factor ``beta``;
- a weight where both deltas are all-zero has no ratio (left out of gamma);
- a zero style delta against a non-zero subject delta has ratio ``inf``,
  which the ``>= 3 * mean`` trimming removes (``mean`` is then ``inf``);
- when gamma cannot be formed (no ratio, nothing left after trimming, or a
  gamma that is zero / not finite) the reference raises ``ReferenceUndefined``.

This module must not import klora_core or ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: The paper's defaults: pattern -> (alpha, beta).
REF_DEFAULTS = {"s": (1.5, 0.5), "s*": (1.5, 1.275)}


class ReferenceUndefined(Exception):
    """The reference cannot define gamma (klora_core must raise KLoRAError there)."""


# ----------------------------------------------------------------------------
# deltas
# ----------------------------------------------------------------------------

def is_factors(delta) -> bool:
    return isinstance(delta, (tuple, list))


def dense64(delta) -> torch.Tensor:
    """The delta as a flat float64 vector (factors: flatten to 2-D and multiply)."""
    if is_factors(delta):
        up, down = delta
        up2 = up.detach().to(torch.float64).reshape(up.shape[0], -1)
        down2 = down.detach().to(torch.float64).reshape(down.shape[0], -1)
        return (up2 @ down2).reshape(-1)
    return delta.detach().to(torch.float64).reshape(-1)


def factor_rank(delta):
    """Inner dimension of (up, down); None for a dense tensor."""
    if is_factors(delta):
        return int(delta[1].shape[0])
    return None


def given_rank(spec, key):
    if spec is None:
        return None
    if isinstance(spec, dict):
        return spec.get(key)
    return spec


def resolve_rank(delta, spec, key):
    given = given_rank(spec, key)
    if given is not None:
        return int(given)
    inner = factor_rank(delta)
    if inner is None:
        raise ReferenceUndefined(f"dense delta for {key!r} has no rank")
    return inner


def top_k_sum(flat64: torch.Tensor, k: int) -> float:
    """Sum of the k largest absolute values, by sorting everything."""
    values = torch.sort(flat64.abs(), descending=True).values
    k = min(k, values.numel())
    return float(values[:k].sum())


def l1(flat64: torch.Tensor) -> float:
    return float(flat64.abs().sum())


# ----------------------------------------------------------------------------
# gamma, schedule, decision
# ----------------------------------------------------------------------------

def plain_mean(values):
    total = 0.0
    for v in values:
        total = total + v
    return total / len(values)


def ref_ratio(subject_l1: float, style_l1: float):
    """sum|dS| / sum|dT|; None when both are zero; inf when only the style is zero."""
    if style_l1 == 0.0:
        if subject_l1 == 0.0:
            return None
        return math.inf
    return subject_l1 / style_l1


def ref_gamma_parts(ratios):
    """(first mean, kept ratios, gamma) or ReferenceUndefined."""
    ratios = list(ratios)
    if len(ratios) == 0:
        raise ReferenceUndefined("no ratios")
    first = plain_mean(ratios)
    kept = []
    for r in ratios:
        if r >= 3.0 * first:
            continue  # outlier
        kept.append(r)
    if len(kept) == 0:
        raise ReferenceUndefined("nothing left after trimming")
    gamma = plain_mean(kept)
    if not math.isfinite(gamma) or gamma <= 0.0:
        raise ReferenceUndefined(f"gamma {gamma!r}")
    return first, kept, gamma


def ref_gamma(ratios) -> float:
    return ref_gamma_parts(ratios)[2]


def ref_scale(p: float, alpha: float, beta: float, pattern: str) -> float:
    if pattern == "s":
        return alpha * p + beta
    if pattern == "s*":
        if alpha == 0:
            return beta
        x = alpha * p + beta
        r = math.fmod(x, alpha)  # exact remainder, sign of x
        if r != 0.0 and (r < 0.0) != (alpha < 0.0):
            r = r + alpha  # the floored ("mod") convention
        return r
    raise ValueError(f"unknown pattern {pattern!r}")


def ref_uses_subject(ts: float, tt: float, gamma: float, scale: float) -> bool:
    return ts / gamma > tt * scale


def ref_margin(ts: float, tt: float, gamma: float, scale: float) -> float:
    """Relative distance of a decision from its boundary (0 = exact tie)."""
    left = ts / gamma
    right = tt * scale
    size = max(abs(left), abs(right))
    if size == 0.0:
        return 0.0
    return abs(left - right) / size


# ----------------------------------------------------------------------------
# the whole pair
# ----------------------------------------------------------------------------

@dataclass
class RefPlan:
    alpha: float
    beta: float
    pattern: str
    ts: dict = field(default_factory=dict)
    tt: dict = field(default_factory=dict)
    l1_s: dict = field(default_factory=dict)
    l1_t: dict = field(default_factory=dict)
    k: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)
    first_mean: float = math.nan
    kept: list = field(default_factory=list)
    gamma: float = math.nan
    subject_only: tuple = ()
    style_only: tuple = ()

    def scale(self, p: float) -> float:
        return ref_scale(p, self.alpha, self.beta, self.pattern)

    def progress(self, i: int, steps: int) -> float:
        return i / steps

    def uses_subject(self, key, p) -> bool:
        return ref_uses_subject(self.ts[key], self.tt[key], self.gamma, self.scale(p))

    def margin(self, key, p) -> float:
        return ref_margin(self.ts[key], self.tt[key], self.gamma, self.scale(p))

    def selection(self, steps: int) -> dict:
        out = {}
        for key in self.ts:
            row = []
            for i in range(steps):
                row.append(self.uses_subject(key, self.progress(i, steps)))
            out[key] = row
        return out

    def margins(self, steps: int) -> dict:
        return {key: [self.margin(key, self.progress(i, steps)) for i in range(steps)] for key in self.ts}

    def rescheduled(self, alpha=None, beta=None, pattern=None) -> "RefPlan":
        pattern = self.pattern if pattern is None else pattern
        copy = RefPlan(**{**self.__dict__})
        copy.pattern = pattern
        copy.alpha = self.alpha if alpha is None else alpha
        copy.beta = self.beta if beta is None else beta
        return copy


def reference_plan(subject, style, alpha=None, beta=None, pattern="s", subject_rank=None, style_rank=None) -> RefPlan:
    default_alpha, default_beta = REF_DEFAULTS[pattern]
    plan = RefPlan(
        alpha=default_alpha if alpha is None else float(alpha),
        beta=default_beta if beta is None else float(beta),
        pattern=pattern,
    )
    plan.subject_only = tuple(k for k in subject if k not in style)
    plan.style_only = tuple(k for k in style if k not in subject)
    for key in subject:
        if key not in style:
            continue
        ds = dense64(subject[key])
        dt = dense64(style[key])
        assert ds.numel() == dt.numel(), key
        rank_s = resolve_rank(subject[key], subject_rank, key)
        rank_t = resolve_rank(style[key], style_rank, key)
        k = min(rank_s * rank_t, ds.numel())
        plan.ranks[key] = (rank_s, rank_t)
        plan.k[key] = k
        plan.ts[key] = top_k_sum(ds, k)
        plan.tt[key] = top_k_sum(dt, k)
        plan.l1_s[key] = l1(ds)
        plan.l1_t[key] = l1(dt)
        r = ref_ratio(plan.l1_s[key], plan.l1_t[key])
        if r is not None:
            plan.ratios[key] = r
    plan.first_mean, plan.kept, plan.gamma = ref_gamma_parts(plan.ratios.values())
    return plan
