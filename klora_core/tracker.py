"""Vectorised per-step choice tracking for a :class:`~klora_core.plan.KLoRAPlan`.

During sampling the choice for every weight is re-evaluated whenever the
progress changes.  This keeps it cheap: the decision ``T_S / gamma > T_T * scale``
is evaluated for all weights at once in float64 (the same IEEE operations as
:meth:`KLoRAPlan.choose`, so decisions are bit-identical), and only the weights
whose choice changed are returned for re-baking.
"""
from __future__ import annotations

import torch

from .plan import KLoRAPlan


class ChoiceTracker:
    """Remembers the applied choice per weight; ``update(progress)`` returns what changed.

    Attributes:
        keys: the plan's shared keys, in plan order.
        current: bool tensor [len(keys)], True = subject applied now.
    """

    def __init__(self, plan: KLoRAPlan, initial_progress: float = 0.0):
        self.plan = plan
        self.keys = list(plan.details)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self._subject = torch.tensor([plan.details[k].subject_topk for k in self.keys], dtype=torch.float64) / plan.gamma
        self._style = torch.tensor([plan.details[k].style_topk for k in self.keys], dtype=torch.float64)
        self.initial = self.evaluate(initial_progress)
        self.current = self.initial.clone()
        self._last_progress = initial_progress

    def evaluate(self, progress: float) -> torch.Tensor:
        """Choices at ``progress`` (bool tensor, True = subject), without changing state."""
        return self._subject > self._style * self.plan.scale(progress)

    def uses_subject(self, key) -> bool:
        return bool(self.current[self.index[key]])

    def update(self, progress: float) -> list:
        """Move to ``progress``; return the keys whose choice changed (empty when none)."""
        if progress == self._last_progress:
            return []
        self._last_progress = progress
        return self._move_to(self.evaluate(progress))

    def reset(self) -> list:
        """Return to the initial choices; return the keys whose choice changed."""
        self._last_progress = None
        return self._move_to(self.initial)

    def _move_to(self, new: torch.Tensor) -> list:
        changed = torch.nonzero(new != self.current).flatten().tolist()
        if changed:
            self.current = new.clone()
        return [self.keys[i] for i in changed]

    def counts(self) -> tuple[int, int]:
        """(weights on subject, weights on style) right now."""
        n_subject = int(self.current.sum())
        return n_subject, len(self.keys) - n_subject
