"""Exact top-K magnitude scores of LoRA deltas.

A delta is given either as low-rank factors ``(up, down)`` whose product is the
already-scaled delta (``up``: [out, r] or conv [out, r, 1, 1]; ``down``: [r, in]
or conv [r, in, kh, kw]; both flattened to 2-D), or as a dense tensor of any
shape.  Every function here is exact: the top-K sum equals summing the K
largest entries of the fully sorted absolute delta.

Memory: the dense delta of one weight is built in row blocks of at most
``block_elements`` entries (float32), so scoring never holds more than one
weight's dense delta, and less for large weights.  Work runs on the device of
the tensors given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from .errors import KLoRAError

#: Largest number of dense-delta entries materialised at once (64 Mi floats = 256 MiB).
DEFAULT_BLOCK_ELEMENTS = 64 * 1024 * 1024

LowRank = tuple  # (up, down)
Delta = Union[torch.Tensor, LowRank]


@dataclass(frozen=True)
class DeltaStats:
    """Magnitude statistics of one delta, in the delta's own units (float64 sums)."""

    topk_sum: float  # sum of the K largest |entries|
    l1: float  # sum of all |entries|
    numel: int


def as_factors(delta: Delta, key: str = "?") -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return 2-D ``(up, down)`` for a low-rank delta, or None for a dense tensor.

    Raises KLoRAError naming ``key`` when the factors do not fit together.
    """
    if isinstance(delta, torch.Tensor):
        return None
    if not isinstance(delta, (tuple, list)) or len(delta) != 2:
        raise KLoRAError(
            f"weight {key!r}: expected (up, down) tensors or a dense delta tensor, got {type(delta).__name__}"
        )
    up, down = delta
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise KLoRAError(f"weight {key!r}: up and down must be tensors")
    if up.dim() < 2 or down.dim() < 2:
        raise KLoRAError(
            f"weight {key!r}: up and down must have at least 2 dimensions, got {tuple(up.shape)} and {tuple(down.shape)}"
        )
    up2 = up.flatten(1)
    down2 = down.flatten(1)
    if up2.shape[1] != down2.shape[0]:
        raise KLoRAError(
            f"weight {key!r}: rank mismatch between up {tuple(up.shape)} (rank {up2.shape[1]}) "
            f"and down {tuple(down.shape)} (rank {down2.shape[0]}); the file is corrupt or not a LoRA"
        )
    return up2, down2


def delta_rank(delta: Delta, key: str = "?") -> int | None:
    """The rank of a low-rank delta (inner dimension), or None for a dense tensor."""
    factors = as_factors(delta, key)
    return None if factors is None else int(factors[1].shape[0])


def delta_shape2d(delta: Delta, key: str = "?") -> tuple[int, int]:
    """(rows, columns) of the delta viewed as a matrix: the first dimension by the product of the rest."""
    factors = as_factors(delta, key)
    if factors is None:
        if delta.dim() == 0:
            return 1, 1
        return int(delta.shape[0]), int(delta[0].numel()) if delta.shape[0] else 0
    return int(factors[0].shape[0]), int(factors[1].shape[1])


def delta_numel(delta: Delta, key: str = "?") -> int:
    factors = as_factors(delta, key)
    if factors is None:
        return int(delta.numel())
    return int(factors[0].shape[0]) * int(factors[1].shape[1])


def dense_delta(delta: Delta, key: str = "?") -> torch.Tensor:
    """The full delta as float32 (2-D for factors, original shape for dense)."""
    factors = as_factors(delta, key)
    if factors is None:
        return delta.to(torch.float32)
    up, down = factors
    return up.to(torch.float32) @ down.to(torch.float32)


@torch.no_grad()
def delta_stats(delta: Delta, k: int, key: str = "?", block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> DeltaStats:
    """Top-K absolute sum and L1 norm of one delta (K capped at its element count).

    Exact: the K largest values of every row block are candidates for the
    global top K, so merging the blocks' candidates loses nothing.
    """
    numel = delta_numel(delta, key)
    if k < 1:
        raise KLoRAError(f"weight {key!r}: K must be at least 1, got {k}")
    k = min(int(k), numel)
    factors = as_factors(delta, key)
    if factors is None:
        flat = delta.reshape(-1)
        rows, cols = 1, flat.numel()
        source = flat
    else:
        up, down = factors
        rows, cols = up.shape[0], down.shape[1]
        up = up.to(torch.float32)
        down = down.to(torch.float32)
    block_rows = max(1, block_elements // max(cols, 1))

    l1 = torch.zeros((), dtype=torch.float64, device=(delta if factors is None else factors[0]).device)
    candidates = None
    if factors is None:
        # Dense input: walk it in flat chunks.
        chunk = max(block_elements, 1)
        for start in range(0, numel, chunk):
            block = source[start : start + chunk].to(torch.float32).abs()
            candidates, l1 = _accumulate(block, k, candidates, l1, key)
    else:
        for start in range(0, rows, block_rows):
            block = (up[start : start + block_rows] @ down).abs_()
            candidates, l1 = _accumulate(block.reshape(-1), k, candidates, l1, key)
    topk = candidates.topk(k, sorted=False).values if candidates.numel() > k else candidates
    l1_value = float(l1)
    if not math.isfinite(l1_value):  # any NaN or inf entry makes the float64 sum non-finite
        raise KLoRAError(f"weight {key!r}: the delta contains NaN or infinite values; the LoRA file is damaged")
    return DeltaStats(topk_sum=float(topk.to(torch.float64).sum()), l1=l1_value, numel=numel)


def _accumulate(block_abs: torch.Tensor, k: int, candidates, l1, key):
    l1 = l1 + block_abs.to(torch.float64).sum()
    if block_abs.numel() > k:
        block_abs = block_abs.topk(k, sorted=False).values
    if candidates is None:
        candidates = block_abs
    else:
        merged = torch.cat([candidates, block_abs])
        candidates = merged.topk(k, sorted=False).values if merged.numel() > k else merged
    return candidates, l1
