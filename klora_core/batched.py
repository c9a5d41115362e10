# SPDX-License-Identifier: GPL-3.0-or-later
"""Exact top-K / L1 scores of many deltas at once (the batched scoring path).

    from klora_core.batched import batched_delta_stats
    stats = batched_delta_stats([(delta, k, key), ...])   # -> [DeltaStats, ...] in input order

Same scores as calling :func:`klora_core.scoring.delta_stats` per weight, to
within 1e-6 relative (in practice ~1e-15): the same float32 products, except
that ``torch.bmm`` and ``torch.mm`` (and one-row blocks) may round a product
differently in the last bit, and the same float64 sums in another order
(the measured differences and speed are in bench/README.md).  Two changes in
*how* the work is done:

1. **Grouping.** Weights whose deltas have the same kind (factors or dense),
   shape, rank, K and device are stacked and scored together: one batched
   matmul (``torch.bmm``) and one reduction per chunk instead of one per
   weight.  Chunks hold at most ``block_elements`` dense-delta entries (all
   weights of the chunk together), so memory stays bounded by about one
   weight's dense delta whatever the number of weights.

2. **Selection** (``method``):

   - ``"topk"``: ``torch.topk`` over each chunk, per weight, then the merged
     candidates.  Sync-free; the path meant for CUDA, where top-k is a radix
     select and launch overhead is what batching saves.
   - ``"threshold"`` (CPU default): exact pruning before the top-K.  A chunk
     of ``n`` entries is split into ``n / 8`` disjoint groups of 8 (strided,
     so the group maxima are one fast vectorised reduction), and those
     maxima again into about ``4 K`` coarser groups.  Every group maximum is
     a real entry at its own position, so the K-th largest coarse maximum
     ``tau`` is a value that at least K entries reach: no entry below
     ``tau`` can be among the K largest.  Only the groups whose maximum
     reaches ``tau`` are gathered and filtered, and ``torch.topk`` runs on
     those few candidates only.  ``tau`` never decreases from chunk to chunk
     (candidates kept from earlier chunks raise it too).  Exact for any
     data, ties included (an entry equal to ``tau`` is kept); data with no
     spread (e.g. an all-zero delta) just gathers everything.

   ``"auto"`` picks ``"threshold"`` on CPU and ``"topk"`` elsewhere
   (bench/README.md says which of these choices are measured).

L1: accumulated in float64 from the float32 entries, like the per-layer
path; on CPU through numpy, which casts in small buffers instead of making a
float64 copy of the block.  Finiteness: that sum is finite exactly when every
entry is (float32 magnitudes cannot overflow a float64 sum), so the separate
``isfinite`` pass of the per-layer path is not needed.  A non-finite delta
raises the same :class:`KLoRAError` as the per-layer path.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

try:  # numpy comes with torch and ComfyUI; only used for a faster float64 sum on CPU
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

from .errors import KLoRAError
from .scoring import DEFAULT_BLOCK_ELEMENTS, DeltaStats, as_factors, delta_numel

#: Default chunk budget on CPU: 4 Mi entries (16 MiB float32), about one SDXL
#: cross-attention k/v delta (1280 x 2048); chosen by timing (bench/README.md).
CPU_BLOCK_ELEMENTS = 4 * 1024 * 1024

METHODS = ("auto", "threshold", "topk")

#: Candidates kept per weight before they are cut back to the K largest.
_MERGE_FACTOR = 4


def default_block_elements(device: torch.device) -> int:
    """The chunk budget used when none is given: smaller on CPU (cache friendly), larger on GPUs."""
    return CPU_BLOCK_ELEMENTS if torch.device(device).type == "cpu" else DEFAULT_BLOCK_ELEMENTS


def resolve_method(method: str, device: torch.device) -> str:
    if method not in METHODS:
        raise KLoRAError(f"unknown batched scoring method {method!r}: expected one of {METHODS}")
    if method == "auto":
        return "threshold" if torch.device(device).type == "cpu" else "topk"
    return method


class _Item:
    __slots__ = ("index", "key", "k", "numel", "rows", "cols", "up", "down", "dense", "device")

    def __init__(self, index, key, delta, k):
        self.index = index
        self.key = key
        self.numel = delta_numel(delta, key)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise KLoRAError(f"weight {key!r}: K must be at least 1, got {k}")
        self.k = min(int(k), self.numel)
        factors = as_factors(delta, key)
        if factors is None:
            self.up = self.down = None
            self.dense = delta.reshape(-1)
            self.rows, self.cols = 1, self.numel
            self.device = delta.device
        else:
            self.up, self.down = factors
            self.dense = None
            self.rows, self.cols = int(self.up.shape[0]), int(self.down.shape[1])
            self.device = self.up.device

    def group_key(self):
        if self.dense is not None:
            return ("dense", self.numel, self.k, str(self.device))
        return ("factors", self.rows, self.cols, int(self.up.shape[1]), self.k, str(self.device))


class _Selector:
    """Per-weight running state: L1 (float64), candidate entries, pruning threshold."""

    __slots__ = ("k", "l1", "parts", "n_parts", "tau")

    def __init__(self, k: int, device):
        self.k = k
        self.l1 = 0.0  # float, or a float64 tensor on GPUs (no sync per chunk)
        self.parts = []
        self.n_parts = 0
        self.tau = -math.inf

    def add(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        self.parts.append(values)
        self.n_parts += values.numel()
        if self.n_parts > _MERGE_FACTOR * self.k:
            self._cut()

    def _cut(self) -> torch.Tensor:
        merged = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        if merged.numel() > self.k:
            merged = merged.topk(self.k, sorted=False).values
        self.parts = [merged]
        self.n_parts = merged.numel()
        if merged.numel() == self.k:
            # K real entries reach merged.min(): nothing below it can enter the top K.
            self.tau = max(self.tau, float(merged.min()))
        return merged

    def finish(self, numel: int, key) -> DeltaStats:
        l1 = float(self.l1)
        if not math.isfinite(l1):
            # float64 sums of float32 entries cannot overflow: only NaN/inf entries get here.
            raise KLoRAError(f"weight {key!r}: the delta contains NaN or infinite values; the LoRA file is damaged")
        if not self.parts:
            top = torch.zeros((), dtype=torch.float64)
        else:
            top = self._cut().to(torch.float64).sum()
        return DeltaStats(topk_sum=float(top), l1=l1, numel=numel)


def _pow2_divisor(n: int, limit: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``limit`` (at least 1)."""
    g = 1
    while g * 2 <= limit and n % (g * 2) == 0:
        g *= 2
    return g


#: Entries per fine pruning group (strided: group j holds entries j, j + m, j + 2m, ...).
_FINE_GROUP = 8


def _select_threshold(block: torch.Tensor, selectors: list) -> None:
    """Feed each row of ``block`` ([b, n] absolute entries, one row per weight) to its selector, pruned.

    Groups are strided (entry ``j + i * m`` for ``i < g``) so the group maxima are
    a fast vectorised reduction; any partition into disjoint groups would do.
    """
    b, n = block.shape
    k = selectors[0].k
    gf = _pow2_divisor(n, _FINE_GROUP)
    m = n // gf
    if m < 2 * k:
        _select_topk(block, selectors)  # too little to prune: plain top-K
        return
    fine = block.view(b, gf, m)
    gmax = fine.amax(dim=1) if gf > 1 else block  # [b, m]: real entries at distinct positions
    # Coarser maxima (about 4K of them) give the threshold cheaply: the K-th
    # largest of ANY set of real entries at distinct positions is reached by K entries.
    gc = _pow2_divisor(m, max(1, m // (4 * k)))
    coarse = gmax.view(b, gc, m // gc).amax(dim=1) if gc > 1 else gmax
    taus = torch.tensor([sel.tau for sel in selectors], dtype=block.dtype, device=block.device)
    taus = torch.maximum(taus, coarse.topk(k, dim=1, sorted=False).values.amin(dim=1))
    where = (gmax >= taus[:, None]).nonzero()  # [c, 2] (weight, group), row-major: weights in order
    picked = fine[where[:, 0], :, where[:, 1]]  # [c, gf]
    keep = picked >= taus[where[:, 0]][:, None]
    values = picked[keep]
    per_group = keep.sum(dim=1)
    per_weight = torch.zeros(b, dtype=per_group.dtype, device=block.device).index_add_(0, where[:, 0], per_group)
    for sel, part, tau in zip(selectors, torch.split(values, per_weight.tolist()), taus.tolist()):
        sel.tau = max(sel.tau, tau)
        sel.add(part)


def _select_topk(block: torch.Tensor, selectors: list) -> None:
    b, n = block.shape
    k = selectors[0].k
    if n > k:
        block = block.topk(k, dim=1, sorted=False).values
    for i, sel in enumerate(selectors):
        sel.add(block[i])


def _score_group(items: list, block_elements: int, method: str, done: Callable[[int], None]) -> None:
    first = items[0]
    rows, cols, k, device = first.rows, first.cols, first.k, first.device
    numel = first.numel
    select = _select_threshold if method == "threshold" else _select_topk
    per_weight = max(numel, 1)
    batch = max(1, block_elements // per_weight)  # whole weights per chunk
    row_block = rows if batch > 1 or numel <= block_elements else max(1, block_elements // max(cols, 1))
    for start in range(0, len(items), batch):
        chunk_items = items[start : start + batch]
        selectors = [_Selector(k, device) for _ in chunk_items]
        if first.dense is None:
            up = torch.stack([it.up.to(torch.float32) for it in chunk_items])  # [b, rows, r]
            down = torch.stack([it.down.to(torch.float32) for it in chunk_items])  # [b, r, cols]
            for r0 in range(0, rows, row_block):
                block = torch.bmm(up[:, r0 : r0 + row_block], down).abs_()
                flat = block.view(block.shape[0], -1)
                _feed(flat, selectors, select)
        else:
            step = numel if numel <= block_elements else block_elements
            for f0 in range(0, numel, step):
                flat = torch.stack([it.dense[f0 : f0 + step].to(torch.float32) for it in chunk_items]).abs_()
                _feed(flat, selectors, select)
        for it, sel in zip(chunk_items, selectors):
            done(it.index, sel.finish(it.numel, it.key))


def _sum_float64(values: torch.Tensor):
    """Sum of float32 ``values`` accumulated in float64 (what the per-layer path does).

    On CPU, numpy casts in small buffers while summing, which is faster than
    torch, whose ``sum(dtype=float64)`` first copies the whole block to float64.
    """
    if _np is not None and values.device.type == "cpu":
        return float(_np.add.reduce(values.numpy(), dtype=_np.float64))
    return values.sum(dtype=torch.float64)


def _feed(flat, selectors, select) -> None:
    for i, sel in enumerate(selectors):
        sel.l1 = sel.l1 + _sum_float64(flat[i])
    select(flat, selectors)


def batched_delta_stats(
    items: Sequence[tuple],
    block_elements: Optional[int] = None,
    method: str = "auto",
    progress: Optional[Callable[[int, int], None]] = None,
) -> list:
    """:class:`DeltaStats` for every ``(delta, k[, key])`` in ``items``, in input order.

    Args:
        items: ``(delta, k)`` or ``(delta, k, key)``; a delta is ``(up, down)``
            (2-D or conv factors, flattened as in :mod:`klora_core.scoring`) or a
            dense tensor.  K is capped at the delta's element count.
        block_elements: most dense-delta entries held at once (all weights of a
            chunk together; a weight larger than this is cut in row blocks).
            Default: :data:`CPU_BLOCK_ELEMENTS` on CPU, the per-layer default on GPUs.
        method: ``"auto"``, ``"threshold"`` or ``"topk"`` (see module docstring).
        progress: optional ``callback(done, total)`` after each finished delta.

    Runs on the devices of the given tensors; equal results on every device.
    """
    parsed = []
    for i, item in enumerate(items):
        if len(item) == 2:
            (delta, k), key = item, "?"
        else:
            delta, k, key = item
        parsed.append(_Item(i, key, delta, k))
    results: list = [None] * len(parsed)
    groups: dict = {}
    for it in parsed:
        groups.setdefault(it.group_key(), []).append(it)
    finished = 0

    def done(index, stats):
        nonlocal finished
        results[index] = stats
        finished += 1
        if progress is not None:
            progress(finished, len(parsed))

    with torch.no_grad():
        for members in groups.values():
            _score_members(members, block_elements, method, done)
    return results


def _score_members(members, block_elements, method, done) -> None:
    first = members[0]
    if first.numel == 0:
        for it in members:
            done(it.index, DeltaStats(topk_sum=0.0, l1=0.0, numel=0))
        return
    budget = default_block_elements(first.device) if block_elements is None else int(block_elements)
    if budget < 1:
        raise KLoRAError(f"block_elements must be at least 1, got {block_elements}")
    _score_group(members, budget, resolve_method(method, first.device), done)
