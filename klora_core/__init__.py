"""K-LoRA in pure torch: score a subject/style LoRA pair and choose one delta per weight per step.

No ComfyUI import anywhere in this package (the nodes in ``nodes/`` do that).
The method, with its formulas and every choice made where the paper leaves
one open, is docs/method.md.

    from klora_core import build_plan
    plan = build_plan(subject, style, alpha=1.5, beta=0.5, pattern="s")
    plan.gamma; plan.scores; plan.selection(steps)
"""
from .errors import KLoRAError
from .gamma import compute_gamma, l1_ratio
from .plan import KLoRAPlan, WeightScore, build_plan, plan_from_scores
from .schedule import DEFAULTS, PATTERN_S, PATTERN_S_STAR, PATTERNS, style_scale
from .scoring import DeltaStats, delta_stats

__version__ = "0.1.0"

__all__ = [
    "KLoRAError",
    "KLoRAPlan",
    "WeightScore",
    "build_plan",
    "plan_from_scores",
    "compute_gamma",
    "l1_ratio",
    "style_scale",
    "delta_stats",
    "DeltaStats",
    "DEFAULTS",
    "PATTERNS",
    "PATTERN_S",
    "PATTERN_S_STAR",
    "__version__",
]
