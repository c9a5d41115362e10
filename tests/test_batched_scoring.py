# SPDX-License-Identifier: GPL-3.0-or-later
"""The batched scorer (klora_core/batched.py) against the per-layer scorer and the full-sort reference.

Pure torch, no ComfyUI.  Three implementations are compared on the same inputs:

- ``batched_delta_stats`` (methods "threshold", "topk", "auto"; many chunk budgets),
- ``klora_core.scoring.delta_stats`` per weight (the per-layer path),
- ``klora_reference``: dense float64 delta, FULL descending sort, sum of the first K.

Tolerances: on integer-valued factors every float32 product and every sum is
exact, so all three must agree exactly (this is also where ties are
everywhere, the hard case for threshold pruning).  On gaussian data the
scorers multiply in float32 and the reference in float64: scores agree to
1e-5 relative with the reference, and batched agrees with per-layer to 1e-6
relative (the same float32 entries up to the last bit: torch.bmm and
torch.mm, and one-row blocks, may round differently; float64 addition order
differs).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import klora_core.batched as batched_mod
from klora_core import KLoRAError, build_plan
from klora_core.batched import METHODS, batched_delta_stats
from klora_core.scoring import delta_stats

from support.klora_reference import dense64, l1, top_k_sum

BUDGETS = (None, 1, 7, 100, 1000, 5000, 1 << 20)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def factors(g, out, inp, rank, kind="gauss", dtype=torch.float32, kh=0, scale=1.0):
    """(up, down) of a Linear (kh=0) or a kh x kh conv weight."""
    up_shape = (out, rank) if not kh else (out, rank, 1, 1)
    down_shape = (rank, inp) if not kh else (rank, inp, kh, kh)
    if kind == "int":
        up = torch.randint(-3, 4, up_shape, generator=g).to(torch.float32)
        down = torch.randint(-3, 4, down_shape, generator=g).to(torch.float32)
    else:
        up = torch.randn(up_shape, generator=g, dtype=torch.float64) * scale
        down = torch.randn(down_shape, generator=g, dtype=torch.float64)
    return up.to(dtype), down.to(dtype)


def dense_of(delta):
    up, down = delta
    return up.to(torch.float32).flatten(1) @ down.to(torch.float32).flatten(1)


def mixed_items(g, kind="gauss", dtype=torch.float32):
    """Many shapes, ranks and forms; several weights per shape so that groups form."""
    items = []
    specs = [
        # (out, in, rank, kh, copies)
        (64, 128, 2, 0, 3),    # big enough for threshold pruning to engage (n/8 >= 2K)
        (96, 80, 4, 0, 4),
        (40, 40, 8, 0, 2),
        (33, 17, 3, 0, 3),     # odd sizes: no power-of-two groups
        (7, 5, 16, 0, 2),      # K = rank^2 capped at numel
        (1, 9, 1, 0, 2),       # one row
        (16, 8, 2, 3, 3),      # conv 3x3 (flattened to 16 x 72)
        (24, 4, 4, 1, 2),      # conv 1x1
    ]
    for out, inp, rank, kh, copies in specs:
        for c in range(copies):
            delta = factors(g, out, inp, rank, kind=kind, dtype=dtype, kh=kh, scale=0.5 + c)
            k_rank = rank if c % 2 == 0 else max(1, rank // 2)
            items.append((delta, rank * k_rank, f"w{out}x{inp}r{rank}k{kh}c{c}"))
    # dense deltas (e.g. LoHa/LoKr), two per shape, one not float32
    for out, inp, rank in ((48, 64, 4), (5, 3, 2)):
        for c in range(2):
            dense = dense_of(factors(g, out, inp, rank, kind=kind))
            if c == 1:
                dense = dense.to(dtype)
            items.append((dense, rank * rank, f"dense{out}x{inp}c{c}"))
    return items


def reference_stats(delta, k):
    flat = dense64(delta)
    return top_k_sum(flat, k), l1(flat)


def check_items(items, exact: bool, budgets=BUDGETS, methods=METHODS):
    per_layer = [delta_stats(d, k, key) for d, k, key in items]
    refs = [reference_stats(d, k) for d, k, _ in items]
    for (d, k, key), pl, (ref_top, ref_l1) in zip(items, per_layer, refs):
        if exact:
            assert (pl.topk_sum, pl.l1) == (ref_top, ref_l1), key
        else:
            assert pl.topk_sum == pytest.approx(ref_top, rel=1e-5), key
            assert pl.l1 == pytest.approx(ref_l1, rel=1e-5), key
    for method in methods:
        for budget in budgets:
            got = batched_delta_stats(items, block_elements=budget, method=method)
            assert len(got) == len(items)
            for (d, k, key), g, pl, (ref_top, ref_l1) in zip(items, got, per_layer, refs):
                where = (key, method, budget)
                assert g.numel == pl.numel, where
                if exact:
                    assert (g.topk_sum, g.l1) == (ref_top, ref_l1), where
                else:
                    assert g.topk_sum == pytest.approx(pl.topk_sum, rel=1e-6), where
                    assert g.l1 == pytest.approx(pl.l1, rel=1e-6), where
                    assert g.topk_sum == pytest.approx(ref_top, rel=1e-5), where
                    assert g.l1 == pytest.approx(ref_l1, rel=1e-5), where


# ----------------------------------------------------------------------------
# equality with per-layer and full sort
# ----------------------------------------------------------------------------

def test_integer_data_all_three_agree_exactly():
    check_items(mixed_items(gen(1), kind="int"), exact=True)


def test_gaussian_data_agrees():
    check_items(mixed_items(gen(2)), exact=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes(dtype):
    check_items(mixed_items(gen(3), dtype=dtype), exact=False, budgets=(None, 7, 1000))


def test_default_budget_matches_per_layer_to_float32_rounding():
    """torch.bmm and torch.mm may round a product differently in the last bit (seen on tiny shapes);
    otherwise the entries are the same, so sums agree far inside 1e-6 and most are bit-identical."""
    items = mixed_items(gen(4))
    got = batched_delta_stats(items)
    identical = 0
    for (d, k, key), g in zip(items, got):
        pl = delta_stats(d, k, key)
        assert g.topk_sum == pytest.approx(pl.topk_sum, rel=1e-7), key
        assert g.l1 == pytest.approx(pl.l1, rel=1e-7), key
        identical += g.topk_sum == pl.topk_sum
    assert identical >= len(items) // 2


@pytest.mark.parametrize("values", ["constant", "zeros_and_few", "one_big_row", "two_levels", "all_zero"])
@pytest.mark.parametrize("k", [1, 5, 64, 255, 256, 4095, 8192])
def test_adversarial_value_patterns(values, k):
    """Ties, plateaus and concentrated mass, with K from 1 to the element count."""
    rows, cols = 64, 128
    if values == "constant":
        dense = torch.full((rows, cols), 0.5)
    elif values == "zeros_and_few":
        dense = torch.zeros(rows, cols)
        dense[3, 7], dense[60, 100], dense[10, 0] = 4.0, -4.0, 2.0
    elif values == "one_big_row":
        dense = torch.randint(-2, 3, (rows, cols), generator=gen(5)).float()
        dense[17] *= 1000
    elif values == "two_levels":
        dense = torch.where(torch.rand(rows, cols, generator=gen(6)) < 0.01, 2.0, 1.0)
    else:
        dense = torch.zeros(rows, cols)
    # a rank-1 factorisation reproduces the same values: dense = dense @ I is too big, so test dense
    # directly and as (dense, identity) factors
    eye = torch.eye(cols)
    items = [(dense, k, "dense"), ((dense, eye), k, "factors")]
    check_items(items, exact=True, budgets=(None, 37, 1000))


def test_threshold_pruning_engages_and_stays_exact(monkeypatch):
    """On weights large enough to prune, the threshold path never falls back to a plain top-K."""
    calls = []
    real = batched_mod._select_topk
    monkeypatch.setattr(batched_mod, "_select_topk", lambda block, sel: (calls.append(block.shape), real(block, sel)))
    g = gen(7)
    items = [(factors(g, 128, 256, 2, kind="int"), 4, f"w{i}") for i in range(5)]
    items += [(factors(g, 128, 256, 4), 16, f"f{i}") for i in range(3)]
    got = batched_delta_stats(items, method="threshold")
    assert calls == []
    for (d, k, key), s in zip(items, got):
        ref_top, ref_l1 = reference_stats(d, k)
        if key.startswith("w"):
            assert (s.topk_sum, s.l1) == (ref_top, ref_l1)
        else:
            assert s.topk_sum == pytest.approx(ref_top, rel=1e-5)


def test_threshold_gathers_few_candidates(monkeypatch):
    """The pruned candidate set is a small multiple of K, not the whole delta."""
    sizes = []
    real_add = batched_mod._Selector.add

    def spy(self, values):
        sizes.append(values.numel())
        return real_add(self, values)

    monkeypatch.setattr(batched_mod._Selector, "add", spy)
    g = gen(8)
    up, down = factors(g, 320, 640, 8)
    batched_delta_stats([((up, down), 64, "w")], method="threshold")
    assert sum(sizes) < 320 * 640 // 20, sizes


# ----------------------------------------------------------------------------
# grouping, memory bound, order, progress
# ----------------------------------------------------------------------------

def test_chunks_respect_the_budget(monkeypatch):
    seen = []
    real = batched_mod._feed
    monkeypatch.setattr(batched_mod, "_feed", lambda flat, sel, select: (seen.append(tuple(flat.shape)), real(flat, sel, select)))
    items = mixed_items(gen(9))
    for budget in (1, 100, 1000, 5000):
        seen.clear()
        batched_delta_stats(items, block_elements=budget)
        assert seen
        widest = 128  # widest row of mixed_items (64 x 128); one row is the smallest chunk of a factor weight
        for b, n in seen:
            assert b * n <= max(budget, widest), (budget, b, n)
            assert b == 1 or b * n <= budget, (budget, b, n)


def test_equal_shapes_are_batched(monkeypatch):
    seen = []
    real = batched_mod._feed
    monkeypatch.setattr(batched_mod, "_feed", lambda flat, sel, select: (seen.append(tuple(flat.shape)), real(flat, sel, select)))
    g = gen(10)
    items = [(factors(g, 16, 32, 4), 16, f"a{i}") for i in range(6)] + [(factors(g, 16, 32, 2), 8, "b")]
    batched_delta_stats(items, block_elements=16 * 32 * 3)
    assert (3, 16 * 32) in seen  # three whole weights per chunk
    assert (1, 16 * 32) in seen  # the lone rank-2 weight forms its own group
    assert len(seen) == 3


def test_results_keep_input_order_and_progress_counts_all():
    g = gen(11)
    items = [(factors(g, 8 + (i % 3), 12, 1 + i % 2), 2, f"w{i}") for i in range(9)]
    calls = []
    got = batched_delta_stats(items, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 9) for i in range(1, 10)]
    for (d, k, key), s in zip(items, got):
        assert s.topk_sum == pytest.approx(delta_stats(d, k, key).topk_sum, rel=1e-6)


def test_two_tuple_items_and_inputs_not_modified():
    g = gen(12)
    up, down = factors(g, 20, 30, 3)
    dense = dense_of(factors(g, 20, 30, 2))
    before = (up.clone(), down.clone(), dense.clone())
    up.requires_grad_(True)
    got = batched_delta_stats([((up, down), 9), (dense, 4)], block_elements=50)
    assert torch.equal(up.detach(), before[0]) and torch.equal(down, before[1]) and torch.equal(dense, before[2])
    assert got[0].topk_sum == pytest.approx(delta_stats((up.detach(), down), 9).topk_sum, rel=1e-6)


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("form", ["up", "down", "dense"])
@pytest.mark.parametrize("method", ["threshold", "topk"])
def test_non_finite_delta_names_key(bad, form, method):
    g = gen(13)
    good = [(factors(g, 64, 128, 2), 4, f"ok{i}") for i in range(2)]
    up, down = factors(g, 64, 128, 2)
    if form == "up":
        up[5, 1] = bad
        item = ((up, down), 4, "broken.key")
    elif form == "down":
        down[0, 100] = bad
        item = ((up, down), 4, "broken.key")
    else:
        dense = dense_of((up, down))
        dense[63, 127] = bad
        item = (dense, 4, "broken.key")
    with pytest.raises(KLoRAError, match="broken.key.*(NaN|infinite)"):
        batched_delta_stats(good + [item], method=method, block_elements=1000)


def test_bad_k_method_budget():
    d = factors(gen(14), 4, 4, 1)
    with pytest.raises(KLoRAError, match="K must be at least 1"):
        batched_delta_stats([(d, 0, "w")])
    with pytest.raises(KLoRAError, match="unknown batched scoring method"):
        batched_delta_stats([(d, 1, "w")], method="fast")
    with pytest.raises(KLoRAError, match="block_elements"):
        batched_delta_stats([(d, 1, "w")], block_elements=0)
    with pytest.raises(KLoRAError, match="rank mismatch"):
        batched_delta_stats([((torch.ones(4, 2), torch.ones(3, 4)), 1, "w")])


def test_empty_input():
    assert batched_delta_stats([]) == []


# ----------------------------------------------------------------------------
# build_plan(batched=True)
# ----------------------------------------------------------------------------

def pair(g, kind):
    shapes = {"a.attn1.to_q": (64, 128), "a.attn1.to_k": (64, 128), "a.attn2.to_k": (64, 96),
              "b.attn1.to_q": (32, 32), "b.conv": (16, 8)}
    subject, style = {}, {}
    for i, (key, (o, n)) in enumerate(shapes.items()):
        kh = 3 if key.endswith("conv") else 0
        subject[key] = factors(g, o, n, 2 + i % 2, kind=kind, kh=kh, scale=1.0 + i)
        style[key] = factors(g, o, n, 4, kind=kind, kh=kh, scale=2.0 - 0.3 * i)
    style["a.attn2.to_k"] = dense_of(style["a.attn2.to_k"])  # a dense style delta
    subject["only.subject"] = factors(g, 4, 4, 1)
    return subject, style


@pytest.mark.parametrize("kind", ["int", "gauss"])
@pytest.mark.parametrize("block_elements", [None, 1, 300])
def test_build_plan_batched_equals_per_layer(kind, block_elements):
    subject, style = pair(gen(15), kind)
    kwargs = {} if block_elements is None else {"block_elements": block_elements}
    plain = build_plan(subject, style, style_rank={"a.attn2.to_k": 4}, **kwargs)
    calls = []
    fast = build_plan(subject, style, style_rank={"a.attn2.to_k": 4}, batched=True,
                      progress=lambda d, t: calls.append((d, t)), **kwargs)
    assert list(fast.details) == list(plain.details)
    assert fast.subject_only == plain.subject_only and fast.style_only == plain.style_only
    for key, d in plain.details.items():
        f = fast.details[key]
        assert (f.k, f.subject_rank, f.style_rank) == (d.k, d.subject_rank, d.style_rank)
        for name in ("subject_topk", "style_topk", "subject_l1", "style_l1"):
            if kind == "int":
                assert getattr(f, name) == getattr(d, name), (key, name)
            else:
                assert getattr(f, name) == pytest.approx(getattr(d, name), rel=1e-6), (key, name)
    assert fast.gamma == pytest.approx(plain.gamma, rel=1e-6)
    for steps in (1, 7, 30):
        assert fast.selection(steps) == plain.selection(steps)
    assert calls and calls[-1] == (len(plain.details), len(plain.details))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_build_plan_batched_checks_shapes_and_ranks():
    subject, style = pair(gen(16), "int")
    with pytest.raises(KLoRAError, match="dense tensor, which carries no rank"):
        build_plan(subject, style, batched=True)
    style["a.attn1.to_q"] = factors(gen(17), 64, 127, 4)
    with pytest.raises(KLoRAError, match="a.attn1.to_q"):
        build_plan(subject, style, style_rank={"a.attn2.to_k": 4}, batched=True)


# ----------------------------------------------------------------------------
# property: random integer data, random K and budgets (ties everywhere)
# ----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    rows=st.sampled_from([1, 3, 16, 48, 64]),
    cols=st.sampled_from([1, 5, 32, 128, 256]),
    rank=st.integers(min_value=1, max_value=4),
    k=st.integers(min_value=1, max_value=20000),
    copies=st.integers(min_value=1, max_value=4),
    budget=st.sampled_from([None, 1, 33, 512, 4096, 1 << 16]),
    method=st.sampled_from(["threshold", "topk"]),
    span=st.sampled_from([1, 3]),
)
def test_property_integer_data_exact(seed, rows, cols, rank, k, copies, budget, method, span):
    g = gen(seed)
    items = []
    for c in range(copies):
        up = torch.randint(-span, span + 1, (rows, rank), generator=g).float()
        down = torch.randint(-span, span + 1, (rank, cols), generator=g).float()
        items.append(((up, down), k, f"w{c}"))
    got = batched_delta_stats(items, block_elements=budget, method=method)
    for (d, kk, key), s in zip(items, got):
        ref_top, ref_l1 = reference_stats(d, kk)
        assert (s.topk_sum, s.l1) == (ref_top, ref_l1), key
