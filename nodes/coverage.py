# SPDX-License-Identifier: GPL-3.0-or-later
"""What the Fuse report says about weights K-LoRA does not switch, so nothing is mixed silently.

K-LoRA exists to apply ONE of the two deltas per attention projection per
step.  A shared weight outside the scope gets what ``outside_scope`` says
(both deltas by default: the mixing K-LoRA avoids), and a weight only one
LoRA covers is applied as a plain LoRA.  These lines make both visible:
which rule recognised attention projections, any shared weight left outside
the scope that either rule calls an attention projection, and how many of
the one-sided weights are attention projections.
"""
from __future__ import annotations

from ..klora_core.options import OUTSIDE_BOTH, OUTSIDE_NONE, OUTSIDE_STYLE, OUTSIDE_SUBJECT, SCOPE_ALL
from ..klora_core.weight_keys import display_key

#: What a weight outside the scope receives, per ``outside_scope`` choice.
_APPLIED = {
    OUTSIDE_BOTH: "get BOTH deltas at every step (mixed)",
    OUTSIDE_SUBJECT: "get only the subject delta",
    OUTSIDE_STYLE: "get only the style delta",
    OUTSIDE_NONE: "get neither delta",
}
SAMPLE_NAMES = 3


def sample_names(keys, limit: int = SAMPLE_NAMES) -> str:
    """``"a, b, c (+4 more)"`` of display names."""
    keys = list(keys)
    text = ", ".join(display_key(k) for k in keys[:limit])
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def unswitched_attention(rule, outside) -> list:
    """Shared weights outside the scope that the structure or the name rules call attention projections."""
    return [k for k in outside if rule.looks_like_attention(k)]


def coverage_lines(rule, scope: str, switched, flagged, outside_scope: str, subject_only, style_only) -> list:
    """Report lines (see module docstring); ``flagged`` comes from :func:`unswitched_attention`."""
    lines = []
    if scope != SCOPE_ALL:
        in_model = f"{len(rule.keys)} in the model, " if rule.keys is not None else ""
        lines.append(f"attention projections recognised from {rule.source}: {in_model}{len(switched)} switched")
    if flagged:
        lines.append(f"WARNING: {len(flagged)} shared weights outside the scope look like attention projections and "
                     f"{_APPLIED.get(outside_scope, outside_scope)}: {sample_names(flagged)}; set scope to "
                     f"'{SCOPE_ALL}' to switch them")
    one_sided = [(label, [k for k in keys if rule.looks_like_attention(k)])
                 for label, keys in (("subject", subject_only), ("style", style_only))]
    if any(keys for _, keys in one_sided):
        counts = " and ".join(f"{len(keys)} only in the {label} LoRA" for label, keys in one_sided)
        lines.append(f"attention projections only one LoRA covers: {counts} (applied as plain LoRAs, not switched)")
    return lines
