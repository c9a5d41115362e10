"""Sampling progress inside ComfyUI: where in the denoising schedule a model call is.

Two measures (docs/method.md, "Progress"):

- ``noise level`` (default): the fraction of the denoising schedule already
  done, read from the current sigma with the model's own sampling object:
  ``p`` solves ``model_sampling.percent_to_sigma(p) == sigma`` (bisection; works
  for every ComfyUI model-sampling class, discrete or continuous, shifted or
  not).  It stays meaningful for denoise < 1, for sampling split across
  KSamplerAdvanced passes and for non-uniform schedulers.  When the run's
  sigmas sit on a uniform grid of progress values (``(start + j) / M``, e.g.
  sgm_uniform, or FLUX's simple scheduler), values within 5% of a grid point
  are snapped to the exact fraction, so a full N-step run gets exactly
  ``i / N`` and matches ``KLoRAPlan.selection(N)`` bit for bit.
- ``step count``: ``i / N`` where ``i`` is the position of the current sigma in
  this pass's ``sample_sigmas`` (``N + 1`` values) and ``N`` the pass's steps.
  Each sampling pass counts from 0.
"""
from __future__ import annotations

import logging

import torch

from ..klora_core.options import MEASURE_NOISE, MEASURE_STEPS, MEASURES  # noqa: F401  (defined once there)

logger = logging.getLogger(__name__)

#: Bisection iterations: 2**-48 (~4e-15) is far below any decision margin that matters.
_BISECTION_STEPS = 48
#: Schedule points used to recognise a uniform grid (evenly spaced, first and last included);
#: each evaluated point is still snapped only when it lies on the grid itself.
GRID_SAMPLE_POINTS = 24
#: Largest deviation from a uniform grid, in grid steps, that still counts as on it.
GRID_TOLERANCE = 0.05


def progress_from_sigma(model_sampling, sigma: float) -> float:
    """Fraction of the schedule done at noise level ``sigma`` (0 = pure noise, 1 = clean)."""
    if sigma <= 0.0:
        return 1.0
    lo, hi = 0.0, 1.0  # percent_to_sigma is non-increasing in percent
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if float(model_sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class ProgressMeter:
    """Progress of each model call of one sampling pass; caches per sigma.

    Args:
        measure: MEASURE_NOISE or MEASURE_STEPS.
        model_sampling: the model's sampling object (``BaseModel.model_sampling``).
        sample_sigmas: 1-D tensor of this pass's schedule (``N + 1`` values).
    """

    def __init__(self, measure: str, model_sampling, sample_sigmas: torch.Tensor):
        self.measure = measure
        self.model_sampling = model_sampling
        self.sigmas = [float(s) for s in sample_sigmas.flatten().tolist()]
        self._cache: dict[float, float] = {}
        self.grid = None
        self._schedule_index: dict[float, int] = {}
        if measure == MEASURE_NOISE:
            positive = [s for s in self.sigmas if s > 0.0]
            self.grid = self._fit_sampled_grid(positive)
            for i, s in enumerate(positive):
                self._schedule_index.setdefault(s, i)

    def _fit_sampled_grid(self, positive: list):
        """fit_grid on up to GRID_SAMPLE_POINTS evenly spaced schedule points (cost independent of steps)."""
        n = len(positive)
        if n < 2:
            return None
        count = min(n, GRID_SAMPLE_POINTS)
        indices = sorted({round(j * (n - 1) / (count - 1)) for j in range(count)})
        progresses = {i: progress_from_sigma(self.model_sampling, positive[i]) for i in indices}
        step = (progresses[indices[-1]] - progresses[indices[0]]) / (indices[-1] - indices[0])
        if step <= 0:
            return None
        grid = round(1.0 / step)
        if grid < 1 or grid > 100000:
            return None
        start = round(progresses[indices[0]] * grid) - indices[0]
        for i, p in progresses.items():
            if abs(p * grid - (start + i)) > GRID_TOLERANCE:
                return None
        return start, grid

    def __call__(self, sigma: float) -> float:
        cached = self._cache.get(sigma)
        if cached is None:
            cached = self._compute(sigma)
            self._cache[sigma] = cached
        return cached

    def _compute(self, sigma: float) -> float:
        if self.measure == MEASURE_STEPS:
            steps = max(len(self.sigmas) - 1, 1)
            # Position of the step this sigma belongs to: the last schedule value >= sigma.
            index = sum(1 for s in self.sigmas[:-1] if s >= sigma) - 1
            return max(index, 0) / steps
        if self.grid is not None and sigma in self._schedule_index:
            # A point of a schedule recognised as uniform: its exact fraction, no search needed.
            start, grid = self.grid
            return (start + self._schedule_index[sigma]) / grid
        p = progress_from_sigma(self.model_sampling, sigma)
        if self.grid is not None:
            start, grid = self.grid
            nearest = round(p * grid)
            if abs(p * grid - nearest) <= GRID_TOLERANCE:
                return nearest / grid
        return min(max(p, 0.0), 1.0)


def current_sigma(transformer_options: dict, timestep) -> float:
    """The noise level of this model call (first batch entry)."""
    sigmas = transformer_options.get("sigmas", timestep)
    if isinstance(sigmas, torch.Tensor):
        return float(sigmas.flatten()[0])
    return float(sigmas)
