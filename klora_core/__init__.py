"""K-LoRA in pure torch: score a subject/style LoRA pair and choose one delta per weight per step.

No ComfyUI import anywhere in this package (the nodes in ``nodes/`` do that).
The method, with its formulas and every choice made where the paper leaves
one open, is docs/method.md.

    from klora_core import build_plan
    plan = build_plan(subject, style, alpha=1.5, beta=0.5, pattern="s")
    plan.gamma; plan.scores; plan.selection(steps)

The names below are imported on first use (PEP 562), so that ``python -m
klora_core --help`` and the command line's message about a missing package
work in a python without torch.
"""
from importlib import import_module

from .errors import KLoRAError

__version__ = "0.1.0"

#: public name -> submodule that defines it.
_LAZY = {
    "compute_gamma": "gamma", "l1_ratio": "gamma",
    "KLoRAPlan": "plan", "WeightScore": "plan", "build_plan": "plan", "plan_from_scores": "plan",
    "DEFAULTS": "schedule", "PATTERN_S": "schedule", "PATTERN_S_STAR": "schedule", "PATTERNS": "schedule",
    "style_scale": "schedule",
    "DeltaStats": "scoring", "delta_stats": "scoring",
}

__all__ = ["KLoRAError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
