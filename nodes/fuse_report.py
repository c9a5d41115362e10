# SPDX-License-Identifier: GPL-3.0-or-later
"""The text K-LoRA Fuse shows on the node and returns as its ``report`` output."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..klora_core.gamma import trimming
from .coverage import sample_names
from .handles import LoRAHandle


@dataclass(frozen=True)
class FuseSettings:
    """What the user chose (validated; ``beta`` already resolved to the number used)."""

    pattern: str
    alpha: float
    beta: float
    scope: str
    outside_scope: str
    progress_measure: str


@dataclass(frozen=True)
class WeightGroups:
    """Unit keys (model order) by what happens to them."""

    switched: Sequence  # both LoRAs cover it, in the scope: one delta per step
    outside: Sequence  # both cover it, outside the scope: settings.outside_scope decides
    subject_only: Sequence  # applied as a plain LoRA
    style_only: Sequence


@dataclass(frozen=True)
class FuseReport:
    """Everything the report says; :meth:`text` writes it."""

    model_family: str
    subject: LoRAHandle
    style: LoRAHandle
    settings: FuseSettings
    weights: WeightGroups
    stats: dict  # tensors matched / unmatched per file (keys subject_matched, ...)
    plan: object = None  # the KLoRAPlan; None when a strength is 0 (nothing to balance)
    notes: Sequence = field(default_factory=tuple)

    def text(self) -> str:
        s, stats, w = self.settings, self.stats, self.weights
        lines = [
            f"K-LoRA on {self.model_family}: subject '{self.subject.name}' (strength {self.subject.strength:g}, "
            f"{stats['subject_matched']} tensors matched, {stats['subject_unmatched']} unmatched) + style "
            f"'{self.style.name}' (strength {self.style.strength:g}, {stats['style_matched']} matched, "
            f"{stats['style_unmatched']} unmatched)",
            f"pattern {s.pattern}, alpha {s.alpha:g}, beta {s.beta:g}; progress by {s.progress_measure}; "
            f"scope: {s.scope}",
        ]
        if self.plan is not None:
            lines += self._schedule_lines()
        lines.append(f"{len(w.outside)} shared weights outside the scope: applied {s.outside_scope}")
        for label, keys in (("only the subject covers", w.subject_only), ("only the style covers", w.style_only)):
            listed = f": {sample_names(keys)}" if keys else ""
            lines.append(f"{len(keys)} weights {label} (applied as a plain LoRA){listed}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def _schedule_lines(self) -> list:
        plan, switched = self.plan, len(self.weights.switched)
        n_first = sum(plan.choose(0.0).values())
        n_last = sum(plan.choose(1.0 - 1e-9).values())
        _, dropped = trimming(plan.ratios.values())
        return [f"gamma {plan.gamma:.6g} (from {len(plan.ratios)} shared weights, {dropped} outliers dropped)",
                f"{switched} weights switch per step: first step {n_first} subject / {switched - n_first} style; "
                f"last step {n_last} subject / {switched - n_last} style"]
