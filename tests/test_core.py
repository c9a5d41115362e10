# SPDX-License-Identifier: GPL-3.0-or-later
"""klora_core against the plain reference in support/klora_reference.py (method: docs/method.md).

Pure torch: no ComfyUI import.  Run with ``python -m pytest tests/test_core.py``.

Tolerances: klora_core multiplies the factors in float32 while the reference
works in float64, so scores are compared to a relative 1e-5 on random float
data and exactly on integer-valued data (where float32 products and sums are
exact).  Selections are compared exactly, except for decisions the reference
puts within ``NEAR`` (relative) of their boundary on float data; the inputs are
random gaussians, so such near-ties are rare, and every comparison asserts that
almost all decisions were checked.
"""
from __future__ import annotations

import math

import pytest
import torch

import klora_core
from klora_core import KLoRAError, build_plan, compute_gamma, style_scale

from support.klora_reference import (
    REF_DEFAULTS,
    ReferenceUndefined,
    ref_gamma,
    ref_gamma_parts,
    ref_scale,
    reference_plan,
)

#: Relative distance from the decision boundary below which float-data decisions are not compared.
NEAR = 1e-5
#: The same for integer-valued (exactly computed) data, per the project's test rules.
NEAR_EXACT = 1e-9
STEPS = (1, 2, 3, 7, 20, 50)


# ----------------------------------------------------------------------------
# input builders
# ----------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def linear(g, out, inp, rank, dtype=torch.float32, scale=1.0):
    up = torch.randn(out, rank, generator=g, dtype=torch.float64) * scale
    down = torch.randn(rank, inp, generator=g, dtype=torch.float64)
    return up.to(dtype), down.to(dtype)


def int_linear(g, out, inp, rank, lo=-3, hi=4):
    up = torch.randint(lo, hi, (out, rank), generator=g).to(torch.float32)
    down = torch.randint(lo, hi, (rank, inp), generator=g).to(torch.float32)
    return up, down


def conv(g, out, inp, rank, kh, kw, dtype=torch.float32):
    up = torch.randn(out, rank, 1, 1, generator=g, dtype=torch.float64)
    down = torch.randn(rank, inp, kh, kw, generator=g, dtype=torch.float64)
    return up.to(dtype), down.to(dtype)


def lora(g, shapes, rank, kind="gauss", dtype=torch.float32):
    """``{key: (up, down)}`` for ``shapes`` = ``{key: (out, in)}``; ``rank`` int or ``{key: int}``."""
    out = {}
    for key, (o, i) in shapes.items():
        r = rank[key] if isinstance(rank, dict) else rank
        if kind == "int":
            out[key] = int_linear(g, o, i, r)
        else:
            # a different magnitude per key, so the per-key ratios differ
            out[key] = linear(g, o, i, r, dtype=dtype, scale=float(torch.rand((), generator=g)) + 0.25)
    return out


def dense_of(delta):
    up, down = delta
    return (up.to(torch.float32).flatten(1) @ down.to(torch.float32).flatten(1))


SHAPES = {
    "down.0.attn1.to_q": (16, 16),
    "down.0.attn1.to_k": (16, 24),
    "down.0.attn2.to_v": (32, 8),
    "mid.attn1.to_out.0": (12, 40),
    "up.1.attn2.to_q": (24, 24),
    "up.1.ff.net.2": (8, 64),
}


# ----------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------

def assert_matches_reference(plan, ref, steps=STEPS, exact=False, rel=1e-5):
    """Scores, gamma, ratios and selections of ``plan`` against ``ref``; returns (#compared, #skipped)."""
    assert list(plan.details) == list(ref.ts)
    assert tuple(plan.subject_only) == tuple(ref.subject_only)
    assert tuple(plan.style_only) == tuple(ref.style_only)
    assert plan.alpha == ref.alpha and plan.beta == ref.beta and plan.pattern == ref.pattern
    for key, d in plan.details.items():
        assert d.k == ref.k[key], key
        assert (d.subject_rank, d.style_rank) == ref.ranks[key], key
        for got, want in ((d.subject_topk, ref.ts[key]), (d.style_topk, ref.tt[key]),
                          (d.subject_l1, ref.l1_s[key]), (d.style_l1, ref.l1_t[key])):
            if exact:
                assert got == want, key
            else:
                assert got == pytest.approx(want, rel=rel, abs=1e-30), key
        assert plan.scores[key] == (d.subject_topk, d.style_topk)
    assert set(plan.ratios) == set(ref.ratios)
    for key, r in ref.ratios.items():
        if math.isinf(r):
            assert math.isinf(plan.ratios[key])
        else:
            assert plan.ratios[key] == pytest.approx(r, rel=1e-12 if exact else rel)
    assert plan.gamma == pytest.approx(ref.gamma, rel=1e-12 if exact else rel)
    near = NEAR_EXACT if exact else NEAR
    compared = skipped = 0
    for n in steps:
        got = plan.selection(n)
        want = ref.selection(n)
        margins = ref.margins(n)
        assert list(got) == list(want)
        for key in want:
            assert len(got[key]) == n
            for i in range(n):
                assert type(got[key][i]) is bool
                if margins[key][i] < near and got[key][i] != want[key][i]:
                    skipped += 1
                    continue
                compared += 1
                assert got[key][i] == want[key][i], (key, n, i, margins[key][i])
    return compared, skipped


def assert_mostly_compared(counts):
    compared, skipped = counts
    assert compared > 0
    assert skipped <= max(1, compared // 100), counts


# ----------------------------------------------------------------------------
# Linear deltas: shapes, ranks, mixed ranks, rank 1, cap
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["s", "s*"])
@pytest.mark.parametrize(
    "rank_s, rank_t",
    [(1, 1), (1, 4), (4, 1), (2, 3), (4, 4), (8, 2), (16, 16), (3, 7)],
)
def test_linear_matches_reference(pattern, rank_s, rank_t):
    g = gen(1000 + 17 * rank_s + rank_t + (500 if pattern == "s*" else 0))
    subject = lora(g, SHAPES, rank_s)
    style = lora(g, SHAPES, rank_t)
    plan = build_plan(subject, style, pattern=pattern)
    ref = reference_plan(subject, style, pattern=pattern)
    assert_mostly_compared(assert_matches_reference(plan, ref))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_integer_data_is_exact(seed, pattern):
    """Integer-valued factors: float32 products are exact, so scores must be bit-identical."""
    g = gen(seed)
    ranks_s = {k: 1 + (i + seed) % 4 for i, k in enumerate(SHAPES)}
    ranks_t = {k: 1 + (2 * i + seed) % 5 for i, k in enumerate(SHAPES)}
    subject = lora(g, SHAPES, ranks_s, kind="int")
    style = lora(g, SHAPES, ranks_t, kind="int")
    plan = build_plan(subject, style, pattern=pattern)
    ref = reference_plan(subject, style, pattern=pattern)
    compared, skipped = assert_matches_reference(plan, ref, exact=True)
    assert skipped == 0


@pytest.mark.parametrize(
    "out, inp, rank",
    [(1, 1, 1), (1, 7, 1), (7, 1, 2), (3, 5, 2), (64, 3, 4), (3, 64, 4), (33, 17, 5), (128, 96, 8)],
)
def test_many_shapes(out, inp, rank):
    g = gen(out * 1000 + inp * 10 + rank)
    shapes = {"a": (out, inp), "b": (out, inp), "c": (inp, out)}
    subject = lora(g, shapes, rank)
    style = lora(g, shapes, max(1, rank // 2))
    plan = build_plan(subject, style)
    ref = reference_plan(subject, style)
    assert_mostly_compared(assert_matches_reference(plan, ref))


def test_mixed_ranks_set_k():
    g = gen(7)
    subject = lora(g, SHAPES, {k: r for k, r in zip(SHAPES, (1, 2, 4, 8, 3, 5))})
    style = lora(g, SHAPES, {k: r for k, r in zip(SHAPES, (6, 1, 2, 2, 3, 16))})
    plan = build_plan(subject, style)
    for key, d in plan.details.items():
        numel = SHAPES[key][0] * SHAPES[key][1]
        assert d.k == min(subject[key][1].shape[0] * style[key][1].shape[0], numel)
    ref = reference_plan(subject, style)
    assert_mostly_compared(assert_matches_reference(plan, ref))


def test_rank_one_both():
    g = gen(8)
    subject = lora(g, SHAPES, 1)
    style = lora(g, SHAPES, 1)
    plan = build_plan(subject, style)
    for key, d in plan.details.items():
        assert d.k == 1
        want = float(dense_of(subject[key]).abs().max())
        assert d.subject_topk == pytest.approx(want, rel=1e-6)
    assert_mostly_compared(assert_matches_reference(plan, reference_plan(subject, style)))


def test_k_capped_at_numel():
    g = gen(9)
    # 3 x 2 = 6 elements, K = 4 * 5 = 20 -> 6; 2 x 2 = 4 elements, K = 3 * 3 = 9 -> 4
    subject = {"a": linear(g, 3, 2, 4), "b": linear(g, 2, 2, 3)}
    style = {"a": linear(g, 3, 2, 5), "b": linear(g, 2, 2, 3)}
    plan = build_plan(subject, style)
    assert plan.details["a"].k == 6
    assert plan.details["b"].k == 4
    for key, d in plan.details.items():
        # top-K over every element is the full L1
        assert d.subject_topk == pytest.approx(d.subject_l1, rel=1e-12)
        assert d.style_topk == pytest.approx(d.style_l1, rel=1e-12)
    assert_mostly_compared(assert_matches_reference(plan, reference_plan(subject, style)))


def test_k_exactly_numel_and_one_below():
    g = gen(10)
    # 4 x 4 = 16 elements; K = 4 * 4 = 16 (exactly numel) and K = 3 * 5 = 15 (one below)
    subject = {"a": linear(g, 4, 4, 4), "b": linear(g, 4, 4, 3)}
    style = {"a": linear(g, 4, 4, 4), "b": linear(g, 4, 4, 5)}
    plan = build_plan(subject, style)
    assert plan.details["a"].k == 16 and plan.details["b"].k == 15
    assert_mostly_compared(assert_matches_reference(plan, reference_plan(subject, style)))


def test_explicit_rank_for_factors_overrides_inner_dimension():
    g = gen(11)
    subject = {"a": linear(g, 16, 16, 4), "b": linear(g, 8, 8, 2)}
    style = {"a": linear(g, 16, 16, 4), "b": linear(g, 8, 8, 2)}
    plan = build_plan(subject, style, subject_rank=2, style_rank={"a": 3})
    assert plan.details["a"].k == 6 and plan.details["b"].k == 4
    ref = reference_plan(subject, style, subject_rank=2, style_rank={"a": 3})
    assert_mostly_compared(assert_matches_reference(plan, ref))


# ----------------------------------------------------------------------------
# conv and dense deltas
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("kh, kw", [(1, 1), (3, 3), (1, 3), (5, 2)])
def test_conv_factors(kh, kw):
    g = gen(20 + kh * 7 + kw)
    subject = {"conv_in": conv(g, 16, 8, 4, kh, kw), "conv_out": conv(g, 8, 16, 2, kh, kw),
               "attn.to_q": linear(g, 16, 16, 4)}
    style = {"conv_in": conv(g, 16, 8, 2, kh, kw), "conv_out": conv(g, 8, 16, 8, kh, kw),
             "attn.to_q": linear(g, 16, 16, 8)}
    plan = build_plan(subject, style)
    assert plan.details["conv_in"].k == 8
    assert plan.details["conv_out"].k == min(16, 8 * 16 * kh * kw)
    assert_mostly_compared(assert_matches_reference(plan, reference_plan(subject, style)))


def test_conv_factors_against_dense_conv_delta():
    """A 4-D dense conv delta is scored like the same delta given as conv factors."""
    g = gen(30)
    factors = {"c": conv(g, 8, 4, 3, 3, 3), "l": linear(g, 8, 8, 3)}
    style = {"c": conv(g, 8, 4, 2, 3, 3), "l": linear(g, 8, 8, 2)}
    dense = {"c": dense_of(factors["c"]).reshape(8, 4, 3, 3), "l": dense_of(factors["l"])}
    from_factors = build_plan(factors, style)
    from_dense = build_plan(dense, style, subject_rank=3)
    for key in factors:
        a, b = from_factors.details[key], from_dense.details[key]
        assert a.k == b.k
        assert a.subject_topk == pytest.approx(b.subject_topk, rel=1e-6)
        assert a.subject_l1 == pytest.approx(b.subject_l1, rel=1e-6)
    ref = reference_plan(dense, style, subject_rank=3)
    assert_mostly_compared(assert_matches_reference(from_dense, ref))


def test_dense_with_int_rank():
    g = gen(31)
    subject = {k: dense_of(v) for k, v in lora(g, SHAPES, 4).items()}
    style = {k: dense_of(v) for k, v in lora(g, SHAPES, 8).items()}
    plan = build_plan(subject, style, subject_rank=4, style_rank=8)
    for key, d in plan.details.items():
        assert d.k == min(32, subject[key].numel())
        assert (d.subject_rank, d.style_rank) == (4, 8)
    ref = reference_plan(subject, style, subject_rank=4, style_rank=8)
    assert_mostly_compared(assert_matches_reference(plan, ref))


def test_dense_with_per_key_ranks():
    g = gen(32)
    ranks_s = {k: r for k, r in zip(SHAPES, (1, 2, 3, 4, 5, 6))}
    ranks_t = {k: r for k, r in zip(SHAPES, (6, 5, 4, 3, 2, 1))}
    subject = {k: dense_of(v) for k, v in lora(g, SHAPES, ranks_s).items()}
    style = {k: dense_of(v) for k, v in lora(g, SHAPES, ranks_t).items()}
    plan = build_plan(subject, style, subject_rank=ranks_s, style_rank=ranks_t)
    for key, d in plan.details.items():
        assert d.k == ranks_s[key] * ranks_t[key]
    ref = reference_plan(subject, style, subject_rank=ranks_s, style_rank=ranks_t)
    assert_mostly_compared(assert_matches_reference(plan, ref))


def test_dense_and_factors_mixed_between_loras():
    g = gen(33)
    subject = lora(g, SHAPES, 4)
    style = {k: dense_of(v) for k, v in lora(g, SHAPES, 2).items()}
    plan = build_plan(subject, style, style_rank=2)
    ref = reference_plan(subject, style, style_rank=2)
    assert_mostly_compared(assert_matches_reference(plan, ref))


# ----------------------------------------------------------------------------
# ties, gamma corner cases
# ----------------------------------------------------------------------------

def test_identical_subject_and_style_is_a_tie_that_goes_to_style():
    g = gen(40)
    subject = lora(g, SHAPES, 4)
    style = {k: (u.clone(), d.clone()) for k, (u, d) in subject.items()}
    for pattern in ("s", "s*"):
        plan = build_plan(subject, style, alpha=0.0, beta=1.0, pattern=pattern)
        assert plan.gamma == 1.0
        for key, (ts, tt) in plan.scores.items():
            assert ts == tt
            assert plan.ratios[key] == 1.0
        assert plan.scale(0.0) == 1.0
        for n in (1, 5, 20):
            assert all(v == [False] * n for v in plan.selection(n).values())
        assert not any(plan.choose(0.3).values())


def test_tie_after_power_of_two_rescale_and_just_below():
    g = gen(41)
    style = lora(g, SHAPES, 4, kind="int")
    subject = {k: (u * 4.0, d) for k, (u, d) in style.items()}
    plan = build_plan(subject, style, alpha=0.0, beta=1.0)
    assert plan.gamma == 4.0
    for key, (ts, tt) in plan.scores.items():
        assert ts == 4.0 * tt
        assert ts / plan.gamma == tt  # exact tie
    assert not any(any(v) for v in plan.selection(10).values())  # ties -> style
    below = plan.with_schedule(beta=0.999)
    assert all(all(v) for v in below.selection(10).values())


def test_identical_pair_default_schedule_s():
    """TS/gamma == TT, so subject iff scale(p) = 1.5 p + 0.5 < 1, i.e. p < 1/3."""
    g = gen(42)
    subject = lora(g, SHAPES, 2)
    style = {k: (u.clone(), d.clone()) for k, (u, d) in subject.items()}
    plan = build_plan(subject, style)
    expected = [i / 10 < 1 / 3 for i in range(10)]  # 0.3 -> 0.95 subject, 0.4 -> 1.1 style
    assert all(v == expected for v in plan.selection(10).values())
    assert expected == [True, True, True, True, False, False, False, False, False, False]


def test_both_zero_weight_left_out_of_gamma():
    g = gen(43)
    subject = lora(g, SHAPES, 2)
    style = lora(g, SHAPES, 2)
    subject["zero"] = (torch.zeros(8, 2), torch.zeros(2, 8))
    style["zero"] = (torch.zeros(8, 3), torch.randn(3, 8, generator=g))  # product is zero
    plan = build_plan(subject, style)
    assert "zero" in plan.details and "zero" not in plan.ratios
    assert plan.scores["zero"] == (0.0, 0.0)
    assert plan.selection(7)["zero"] == [False] * 7  # 0 > 0 is false -> style
    ref = reference_plan(subject, style)
    assert_mostly_compared(assert_matches_reference(plan, ref))
    without = build_plan({k: v for k, v in subject.items() if k != "zero"},
                         {k: v for k, v in style.items() if k != "zero"})
    assert plan.gamma == without.gamma


def test_zero_style_on_one_weight_is_dropped_from_gamma_and_picks_subject():
    g = gen(44)
    subject = lora(g, SHAPES, 2)
    style = lora(g, SHAPES, 2)
    style["extra"] = (torch.zeros(8, 2), torch.zeros(2, 8))
    subject["extra"] = linear(g, 8, 8, 2)
    plan = build_plan(subject, style)
    assert math.isinf(plan.ratios["extra"])
    # spec, literally: the first mean is inf, so ">= 3 * mean" drops exactly the inf ratio
    # and gamma is the plain mean of all the finite ratios (no further trimming)
    finite = [r for k, r in plan.ratios.items() if k != "extra"]
    assert plan.gamma == pytest.approx(sum(finite) / len(finite), rel=1e-12)
    assert plan.selection(9)["extra"] == [True] * 9
    ref = reference_plan(subject, style)
    assert_mostly_compared(assert_matches_reference(plan, ref))


def test_zero_subject_on_one_weight_has_ratio_zero_and_picks_style():
    g = gen(45)
    subject = lora(g, SHAPES, 2)
    style = lora(g, SHAPES, 2)
    subject["extra"] = (torch.zeros(8, 2), torch.ones(2, 8))
    style["extra"] = linear(g, 8, 8, 2)
    plan = build_plan(subject, style)
    assert plan.ratios["extra"] == 0.0
    assert plan.selection(9)["extra"] == [False] * 9
    assert_mostly_compared(assert_matches_reference(plan, reference_plan(subject, style)))


def _scaled_pair(factors):
    """Subject = c * style per key (c a power of two), so ratio == c and TS == c * TT exactly."""
    g = gen(46)
    style, subject = {}, {}
    for i, c in enumerate(factors):
        up, down = int_linear(g, 8, 8, 2, lo=1, hi=4)  # strictly positive: never all-zero
        style[f"k{i}"] = (up, down)
        subject[f"k{i}"] = (up * c, down)
    return subject, style


def test_gamma_outlier_trimming_boundary_is_inclusive():
    # ratios 1, 1, 1, 8: mean 11/4; 8 >= 3 * 2.75 = 8.25? no -> kept
    subject, style = _scaled_pair([1.0, 1.0, 1.0, 8.0])
    plan = build_plan(subject, style)
    assert plan.gamma == 11.0 / 4.0 == ref_gamma(plan.ratios.values())
    # ratios 1, 1, 1, 9 would sit exactly on the boundary (9 >= 3 * 3): dropped
    assert compute_gamma([1.0, 1.0, 1.0, 9.0]) == 1.0 == ref_gamma([1.0, 1.0, 1.0, 9.0])
    # ratios 1, 1, 1, 1, 16: mean 4, 16 >= 12 -> dropped, gamma 1
    subject, style = _scaled_pair([1.0, 1.0, 1.0, 1.0, 16.0])
    plan = build_plan(subject, style)
    assert plan.gamma == 1.0
    first, kept, gamma = ref_gamma_parts(plan.ratios.values())
    assert (first, sorted(kept), gamma) == (4.0, [1.0] * 4, 1.0)
    # the outlier weight: TS/gamma = 16 TT, style factor at most 2 -> subject throughout
    assert plan.selection(10)["k4"] == [True] * 10
    assert_matches_reference(plan, reference_plan(subject, style), exact=True)


def test_gamma_trimming_only_once():
    # mean 9.75 -> drop 32 (>= 29.25); the kept mean (1,2,4 -> 7/3) is NOT trimmed again
    assert compute_gamma([1.0, 2.0, 4.0, 32.0]) == pytest.approx(7.0 / 3.0, rel=1e-15)
    assert ref_gamma([1.0, 2.0, 4.0, 32.0]) == pytest.approx(7.0 / 3.0, rel=1e-15)


# ----------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["s", "s*"])
@pytest.mark.parametrize("alpha, beta", [(1.5, 0.5), (1.5, 1.275), (0.7, 0.2), (2.0, 3.1), (0.0, 0.8), (0.0, 0.0), (3.0, 0.0)])
def test_scale_matches_written_out_formula(pattern, alpha, beta):
    for n in (1, 3, 7, 20, 40, 50, 100):
        for i in range(n):
            p = i / n
            want = ref_scale(p, alpha, beta, pattern)
            assert style_scale(p, alpha, beta, pattern) == want, (n, i)
    if pattern == "s*" and alpha > 0:
        for p in (0.0, 0.01, 0.2, 0.5, 0.99):
            assert 0.0 <= style_scale(p, alpha, beta, pattern) < alpha


def test_paper_defaults():
    g = gen(50)
    subject = lora(g, SHAPES, 2)
    style = lora(g, SHAPES, 2)
    assert REF_DEFAULTS == {"s": (1.5, 0.5), "s*": (1.5, 1.275)}
    plan_s = build_plan(subject, style)
    assert (plan_s.pattern, plan_s.alpha, plan_s.beta) == ("s", 1.5, 0.5)
    plan_star = build_plan(subject, style, pattern="s*")
    assert (plan_star.alpha, plan_star.beta) == (1.5, 1.275)
    # only one of them given: the other takes the pattern's default
    assert build_plan(subject, style, alpha=2.0).beta == 0.5
    assert build_plan(subject, style, beta=0.25, pattern="s*").alpha == 1.5
    assert build_plan(subject, style, alpha=1.0, pattern="s*").beta == 1.275
    assert plan_s.scale(0.0) == 0.5 and plan_s.scale(0.5) == 1.25
    assert plan_star.scale(0.0) == 1.275
    assert_mostly_compared(assert_matches_reference(plan_s, reference_plan(subject, style)))
    assert_mostly_compared(assert_matches_reference(plan_star, reference_plan(subject, style, pattern="s*")))


def test_s_star_wraps_to_zero_at_p_015():
    """s* defaults: scale = (1.5 p + 1.275) mod 1.5 -> 1.275 .. 1.5 for p < 0.15, ~0 at 0.15, then grows."""
    # keys k0..k2: subject == style (c = 1); k3: subject = style / 32.
    # gamma = (3 + 1/32) / 4 = 97/128; k0: 1/gamma = 128/97 ~ 1.3196; k3: (1/32)/gamma = 4/97 ~ 0.04124
    subject, style = _scaled_pair([1.0, 1.0, 1.0, 1.0 / 32.0])
    plan = build_plan(subject, style, pattern="s*")
    assert plan.gamma == 97.0 / 128.0
    assert plan.scale(0.15) == pytest.approx(0.0, abs=1e-12)
    assert plan.scale(0.1499) == pytest.approx(1.49985, rel=1e-9)
    assert plan.scale(0.1501) == pytest.approx(0.00015, abs=1e-9)
    sel = plan.selection(100)
    # the weak subject only wins right after the wrap: p = 0.15, 0.16, 0.17 (scale 0, 0.015, 0.03 < 0.0412)
    assert [i for i, v in enumerate(sel["k3"]) if v] == [15, 16, 17]
    # the balanced weights: subject while scale < 1.3196 -> p in {0, .01, .02}; style until the wrap; subject after
    assert [i for i, v in enumerate(sel["k0"]) if not v] == list(range(3, 15))
    assert sel["k0"] == sel["k1"] == sel["k2"]
    # 20 steps: step 3 is p = 0.15 exactly
    sel20 = plan.selection(20)
    assert [i for i, v in enumerate(sel20["k3"]) if v] == [3]
    assert sel20["k0"] == [True] + [False] * 2 + [True] * 17
    assert plan.choose(0.15)["k3"] is True and plan.choose(0.149)["k3"] is False
    assert_matches_reference(plan, reference_plan(subject, style, pattern="s*"), steps=(1, 7, 20, 40, 100), exact=True)


def test_s_star_identical_pair_three_phases():
    """TS/gamma == TT: subject iff scale < 1: style for p < 0.15, subject for 0.15 <= p < 0.8167, style after."""
    g = gen(51)
    subject = lora(g, SHAPES, 2)
    style = {k: (u.clone(), d.clone()) for k, (u, d) in subject.items()}
    plan = build_plan(subject, style, pattern="s*")
    expected = [False] * 3 + [True] * 14 + [False] * 3  # 20 steps: p = 0.15 .. 0.80 subject
    assert all(v == expected for v in plan.selection(20).values())


@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_alpha_zero_has_no_time_dependence(pattern):
    g = gen(52)
    subject = lora(g, SHAPES, 3)
    style = lora(g, SHAPES, 3)
    plan = build_plan(subject, style, alpha=0.0, beta=0.9, pattern=pattern)
    for n in (1, 5, 33):
        for key, row in plan.selection(n).items():
            assert row == [row[0]] * n, key
    assert plan.selection(8) == build_plan(subject, style, alpha=0.0, beta=0.9, pattern="s").selection(8)
    assert_mostly_compared(assert_matches_reference(plan, reference_plan(subject, style, 0.0, 0.9, pattern)))


@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_alpha_beta_zero_means_subject_everywhere(pattern):
    g = gen(53)
    subject = lora(g, SHAPES, 3)
    style = lora(g, SHAPES, 3)
    subject["dead"] = (torch.zeros(8, 2), torch.zeros(2, 8))  # TS = 0 here
    style["dead"] = linear(g, 8, 8, 2)
    plan = build_plan(subject, style, alpha=0.0, beta=0.0, pattern=pattern)
    sel = plan.selection(12)
    for key, row in sel.items():
        assert row == ([False] * 12 if key == "dead" else [True] * 12), key
    assert_matches_reference(plan, reference_plan(subject, style, 0.0, 0.0, pattern))


def test_selection_uses_progress_i_over_n():
    g = gen(54)
    subject = lora(g, SHAPES, 4)
    style = lora(g, SHAPES, 2)
    for pattern in ("s", "s*"):
        plan = build_plan(subject, style, pattern=pattern)
        for n in (1, 4, 13):
            sel = plan.selection(n)
            for i in range(n):
                chosen = plan.choose(i / n)
                for key in plan.details:
                    assert sel[key][i] == chosen[key] == plan.uses_subject(key, i / n)


# ----------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_low_and_high_precision_inputs(dtype, pattern):
    g = gen(60)
    subject = lora(g, SHAPES, 4, dtype=dtype)
    style = lora(g, SHAPES, 8, dtype=dtype)
    subject["conv"] = conv(g, 8, 4, 2, 3, 3, dtype=dtype)
    style["conv"] = conv(g, 8, 4, 4, 3, 3, dtype=dtype)
    plan = build_plan(subject, style, pattern=pattern)
    ref = reference_plan(subject, style, pattern=pattern)  # upcasts the (exact) low-precision values
    assert_mostly_compared(assert_matches_reference(plan, ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dense_inputs(dtype):
    g = gen(61)
    subject = {k: dense_of(v).to(dtype) for k, v in lora(g, SHAPES, 4).items()}
    style = {k: dense_of(v).to(dtype) for k, v in lora(g, SHAPES, 2).items()}
    plan = build_plan(subject, style, subject_rank=4, style_rank=2)
    ref = reference_plan(subject, style, subject_rank=4, style_rank=2)
    # dense half-precision values are exact in float32: scores agree tightly
    assert_mostly_compared(assert_matches_reference(plan, ref, rel=1e-9))


def test_inputs_not_modified():
    g = gen(62)
    subject = lora(g, SHAPES, 4)
    style = {k: dense_of(v) for k, v in lora(g, SHAPES, 2).items()}
    before_s = {k: (u.clone(), d.clone()) for k, (u, d) in subject.items()}
    before_t = {k: v.clone() for k, v in style.items()}
    build_plan(subject, style, style_rank=2, block_elements=5)
    for k in subject:
        assert torch.equal(subject[k][0], before_s[k][0]) and torch.equal(subject[k][1], before_s[k][1])
        assert torch.equal(style[k], before_t[k])


# ----------------------------------------------------------------------------
# keys only one LoRA covers
# ----------------------------------------------------------------------------

def test_subject_only_and_style_only_keys():
    g = gen(70)
    subject = lora(g, SHAPES, 2)
    style = lora(g, SHAPES, 2)
    subject["only.s.b"] = linear(g, 4, 4, 1)
    subject["only.s.a"] = linear(g, 4, 4, 1)
    style["only.t"] = linear(g, 4, 4, 1)
    plan = build_plan(subject, style)
    assert plan.subject_only == ("only.s.b", "only.s.a")
    assert plan.style_only == ("only.t",)
    assert set(plan.details) == set(SHAPES)
    assert set(plan.scores) == set(SHAPES)
    assert set(plan.selection(3)) == set(SHAPES)
    # they do not take part in gamma
    assert plan.gamma == build_plan({k: subject[k] for k in SHAPES}, style).gamma
    assert_mostly_compared(assert_matches_reference(plan, reference_plan(subject, style)))


# ----------------------------------------------------------------------------
# chunked scoring
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("block_elements", [1, 2, 7, 15, 16, 17, 63, 100, 1000])
def test_small_block_elements_is_exact(block_elements):
    g = gen(80)
    subject = lora(g, SHAPES, {k: r for k, r in zip(SHAPES, (1, 2, 3, 4, 8, 5))}, kind="int")
    style = lora(g, SHAPES, {k: r for k, r in zip(SHAPES, (4, 4, 2, 1, 8, 3))}, kind="int")
    subject["conv"] = (torch.randint(-3, 4, (8, 2, 1, 1), generator=g).float(),
                       torch.randint(-3, 4, (2, 4, 3, 3), generator=g).float())
    style["conv"] = (torch.randint(-3, 4, (8, 3, 1, 1), generator=g).float(),
                     torch.randint(-3, 4, (3, 4, 3, 3), generator=g).float())
    whole = build_plan(subject, style)
    chunked = build_plan(subject, style, block_elements=block_elements)
    assert chunked.details == whole.details
    assert chunked.gamma == whole.gamma
    assert_matches_reference(chunked, reference_plan(subject, style), exact=True)
    # dense inputs are chunked too
    dense_s = {k: dense_of(v) for k, v in subject.items()}
    dense_t = {k: dense_of(v) for k, v in style.items()}
    ranks_s = {k: v[1].shape[0] for k, v in subject.items()}
    ranks_t = {k: v[1].shape[0] for k, v in style.items()}
    chunked_dense = build_plan(dense_s, dense_t, subject_rank=ranks_s, style_rank=ranks_t, block_elements=block_elements)
    assert chunked_dense.details == whole.details


@pytest.mark.parametrize("block_elements", [1, 3, 50, 257])
def test_small_block_elements_float_data(block_elements):
    """Largest elements spread across blocks: chunked top-K equals the reference's full sort."""
    g = gen(81)
    subject = lora(g, SHAPES, 8)
    style = lora(g, SHAPES, 4)
    plan = build_plan(subject, style, block_elements=block_elements)
    whole = build_plan(subject, style)
    # (row blocks may be multiplied by a different float32 kernel: agreement to float32 rounding;
    # the integer-data test above checks bit-exactness of the chunked top-K itself)
    for key in SHAPES:
        assert plan.details[key].subject_topk == pytest.approx(whole.details[key].subject_topk, rel=1e-6)
        assert plan.details[key].style_topk == pytest.approx(whole.details[key].style_topk, rel=1e-6)
    assert_mostly_compared(assert_matches_reference(plan, reference_plan(subject, style)))


# ----------------------------------------------------------------------------
# progress callback and with_schedule
# ----------------------------------------------------------------------------

def test_progress_called_once_per_shared_weight():
    g = gen(90)
    subject = lora(g, SHAPES, 2)
    style = lora(g, SHAPES, 2)
    subject["only.s"] = linear(g, 4, 4, 1)
    style["only.t"] = linear(g, 4, 4, 1)
    calls = []
    build_plan(subject, style, progress=lambda done, total: calls.append((done, total)))
    n = len(SHAPES)
    assert calls == [(i, n) for i in range(1, n + 1)]


def test_with_schedule_reuses_scores(monkeypatch):
    g = gen(91)
    subject = lora(g, SHAPES, 4)
    style = lora(g, SHAPES, 2)
    plan = build_plan(subject, style)
    ref = reference_plan(subject, style)

    def no_rescoring(*args, **kwargs):
        raise AssertionError("with_schedule must not rescore")

    monkeypatch.setattr(klora_core.scoring, "delta_stats", no_rescoring)
    monkeypatch.setattr(klora_core.plan, "delta_stats", no_rescoring)
    for alpha, beta, pattern in [(None, None, "s*"), (0.5, 0.25, "s"), (2.0, None, None), (None, 0.0, None), (0.0, 1.0, "s*")]:
        again = plan.with_schedule(alpha=alpha, beta=beta, pattern=pattern)
        assert again.details == plan.details
        assert again.gamma == plan.gamma
        assert again.ratios == plan.ratios
        new_pattern = plan.pattern if pattern is None else pattern
        new_alpha = plan.alpha if alpha is None else alpha
        new_beta = plan.beta if beta is None else beta
        assert (again.pattern, again.alpha, again.beta) == (new_pattern, new_alpha, new_beta)
        assert_mostly_compared(assert_matches_reference(again, ref.rescheduled(new_alpha, new_beta, new_pattern)))
    # the original plan is unchanged
    assert (plan.alpha, plan.beta, plan.pattern) == (1.5, 0.5, "s")


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------

def _pair(seed=100):
    g = gen(seed)
    return lora(g, SHAPES, 2), lora(g, SHAPES, 2)


def test_error_is_value_error():
    assert issubclass(KLoRAError, ValueError)


def test_error_no_shared_keys():
    g = gen(101)
    with pytest.raises(KLoRAError, match="both"):
        build_plan({"a": linear(g, 4, 4, 1)}, {"b": linear(g, 4, 4, 1)})
    with pytest.raises(KLoRAError):
        build_plan({}, {})


def test_error_all_zero_subject():
    subject, style = _pair()
    subject = {k: (torch.zeros_like(u), d) for k, (u, d) in subject.items()}
    with pytest.raises(KLoRAError, match="subject") as info:
        build_plan(subject, style)
    assert "zero" in str(info.value)


def test_error_all_zero_style():
    subject, style = _pair()
    style = {k: (u, torch.zeros_like(d)) for k, (u, d) in style.items()}
    with pytest.raises(KLoRAError, match="style") as info:
        build_plan(subject, style)
    assert "zero" in str(info.value)


def test_error_both_all_zero():
    subject, style = _pair()
    subject = {k: (torch.zeros_like(u), d) for k, (u, d) in subject.items()}
    style = {k: (torch.zeros_like(u), d) for k, (u, d) in style.items()}
    with pytest.raises(KLoRAError, match="gamma"):
        build_plan(subject, style)


def test_error_zero_style_here_and_zero_subject_there():
    """Ratios inf and 0: the inf is trimmed, gamma would be 0 -> undefined."""
    g = gen(102)
    subject = {"a": linear(g, 4, 4, 1), "b": (torch.zeros(4, 1), torch.ones(1, 4))}
    style = {"a": (torch.zeros(4, 1), torch.ones(1, 4)), "b": linear(g, 4, 4, 1)}
    with pytest.raises(ReferenceUndefined):
        reference_plan(subject, style)
    with pytest.raises(KLoRAError, match="gamma"):
        build_plan(subject, style)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["subject_up", "subject_down", "style_up", "style_dense", "subject_dense"])
def test_error_non_finite_delta_names_key(bad, where):
    subject, style = _pair()
    key = "up.1.attn2.to_q"
    if where == "subject_up":
        u, d = subject[key]
        u = u.clone()
        u[3, 1] = bad
        subject[key] = (u, d)
    elif where == "subject_down":
        u, d = subject[key]
        d = d.clone()
        d[0, 5] = bad
        subject[key] = (u, d)
    elif where == "style_up":
        u, d = style[key]
        u = u.clone()
        u[0, 0] = bad
        style[key] = (u, d)
    elif where == "style_dense":
        dense = dense_of(style[key])
        dense[2, 2] = bad
        style[key] = dense
    else:
        dense = dense_of(subject[key])
        dense[-1, -1] = bad
        subject[key] = dense
    with pytest.raises(KLoRAError) as info:
        build_plan(subject, style, subject_rank=2, style_rank=2)
    message = str(info.value)
    assert key in message
    assert "NaN" in message or "inf" in message.lower()


def test_error_rank_mismatch_names_key():
    subject, style = _pair()
    key = "mid.attn1.to_out.0"
    subject[key] = (torch.randn(12, 4), torch.randn(3, 40))
    with pytest.raises(KLoRAError, match="rank") as info:
        build_plan(subject, style)
    assert key in str(info.value)
    subject, style = _pair()
    style["conv"] = (torch.randn(8, 4, 1, 1), torch.randn(2, 4, 3, 3))
    subject["conv"] = conv(gen(3), 8, 4, 2, 3, 3)
    with pytest.raises(KLoRAError, match="rank") as info:
        build_plan(subject, style)
    assert "conv" in str(info.value)


def test_error_dense_without_rank():
    subject, style = _pair()
    key = "down.0.attn1.to_k"
    subject[key] = dense_of(subject[key])
    with pytest.raises(KLoRAError, match="subject_rank") as info:
        build_plan(subject, style)
    assert key in str(info.value)
    # a per-key mapping that misses the key
    with pytest.raises(KLoRAError, match="subject_rank") as info:
        build_plan(subject, style, subject_rank={"other": 2})
    assert key in str(info.value)
    # the style side
    subject, style = _pair()
    style[key] = dense_of(style[key])
    with pytest.raises(KLoRAError, match="style_rank"):
        build_plan(subject, style)


@pytest.mark.parametrize("bad_rank", [0, -1, 2.5, True])
def test_error_bad_rank_value(bad_rank):
    subject, style = _pair()
    subject = {k: dense_of(v) for k, v in subject.items()}
    with pytest.raises(KLoRAError, match="rank"):
        build_plan(subject, style, subject_rank=bad_rank)


@pytest.mark.parametrize("pattern", ["x", "S", "s**", "", None])
def test_error_unknown_pattern(pattern):
    subject, style = _pair()
    with pytest.raises(KLoRAError) as info:
        build_plan(subject, style, pattern=pattern)
    assert "pattern" in str(info.value)
    assert "'s'" in str(info.value) and "'s*'" in str(info.value)
    plan = build_plan(subject, style)
    if pattern is not None:  # None means "keep" in with_schedule
        with pytest.raises(KLoRAError, match="pattern"):
            plan.with_schedule(pattern=pattern)
        with pytest.raises(KLoRAError, match="pattern"):
            style_scale(0.5, 1.5, 0.5, pattern)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "abc"])
def test_error_non_finite_alpha_beta(bad):
    subject, style = _pair()
    with pytest.raises(KLoRAError, match="alpha"):
        build_plan(subject, style, alpha=bad)
    with pytest.raises(KLoRAError, match="beta"):
        build_plan(subject, style, beta=bad, pattern="s*")
    plan = build_plan(subject, style)
    with pytest.raises(KLoRAError, match="alpha"):
        plan.with_schedule(alpha=bad)
    with pytest.raises(KLoRAError, match="beta"):
        plan.with_schedule(beta=bad)


def test_error_shape_mismatch_different_size():
    subject, style = _pair()
    key = "down.0.attn2.to_v"
    style[key] = linear(gen(5), 32, 9, 2)
    with pytest.raises(KLoRAError) as info:
        build_plan(subject, style)
    assert key in str(info.value)


@pytest.mark.parametrize("form", ["factors", "dense", "mixed"])
def test_error_shape_mismatch_same_size(form):
    """[8, 6] against [6, 8] (same element count): different weights, must be refused.

    The method pairs two deltas of the SAME weight; an [8, 6] delta and a [6, 8]
    delta cannot both be deltas of one weight.  Comparing element counts only
    lets this through and silently scores unrelated tensors against each other.
    """
    g = gen(6)
    subject, style = _pair()
    key = "odd.to_q"
    s_delta = linear(g, 8, 6, 2)
    t_delta = linear(g, 6, 8, 2)
    if form == "dense":
        s_delta, t_delta = dense_of(s_delta), dense_of(t_delta)
    elif form == "mixed":
        t_delta = dense_of(t_delta)
    subject[key], style[key] = s_delta, t_delta
    with pytest.raises(KLoRAError) as info:
        build_plan(subject, style, subject_rank=2, style_rank=2)
    assert key in str(info.value)


@pytest.mark.parametrize("steps", [0, -1, -50, 2.5, "10", None, True])
def test_error_bad_steps(steps):
    subject, style = _pair()
    plan = build_plan(subject, style)
    with pytest.raises(KLoRAError, match="steps"):
        plan.selection(steps)


def test_compute_gamma_errors_and_values():
    with pytest.raises(KLoRAError, match="gamma"):
        compute_gamma([])
    with pytest.raises(KLoRAError, match="subject"):
        compute_gamma([0.0, 0.0, 0.0])
    with pytest.raises(KLoRAError, match="style"):
        compute_gamma([math.inf, math.inf])
    with pytest.raises(KLoRAError, match="gamma"):
        compute_gamma([math.inf, 0.0])
    for ratios in ([1.0], [2.0, 3.0], [0.5, 0.5, 0.5, 100.0], [1.0, math.inf, 3.0], [0.0, 1.0]):
        assert compute_gamma(ratios) == pytest.approx(ref_gamma(ratios), rel=1e-15)
    for ratios in ([], [0.0], [math.inf], [math.inf, 0.0]):
        with pytest.raises(ReferenceUndefined):
            ref_gamma(ratios)


def test_dense_delta_with_its_own_rank_in_a_tuple():
    """``{key: (dense, rank)}`` is the same as a dense delta plus ``<side>_rank={key: rank}``."""
    g = gen(4242)
    subject = {f"w{i}": torch.randn(12, 10, generator=g) for i in range(4)}
    style = {f"w{i}": torch.randn(12, 10, generator=g) for i in range(4)}
    ranks_s = {f"w{i}": 1 + i for i in range(4)}
    ranks_t = {f"w{i}": 3 for i in range(4)}
    tupled = build_plan({k: (v, ranks_s[k]) for k, v in subject.items()},
                        {k: (v, ranks_t[k]) for k, v in style.items()})
    ref = reference_plan(subject, style, subject_rank=ranks_s, style_rank=ranks_t)
    for key in subject:
        assert tupled.details[key].k == min(ranks_s[key] * 3, 120)
        assert tupled.scores[key][0] == pytest.approx(ref.ts[key], rel=1e-6)
    assert tupled.gamma == pytest.approx(ref.gamma, rel=1e-6)
