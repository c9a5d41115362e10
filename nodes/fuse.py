"""Building a K-LoRA fused model from a ModelPatcher and two LoRA handles.

``fuse_model`` is what the "K-LoRA Fuse" node runs.  It never mutates the
model it is given: everything happens on a clone, and any error is raised
before the clone is returned, so a failure leaves the user's model unpatched.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import comfy.utils

from ..klora_core import options, schedule
from ..klora_core.errors import KLoRAError
from ..klora_core.weight_keys import display_key, weight_name
from ..klora_core.plan import plan_from_scores, scores_at_strengths
from .adapters import lora_factors
from .attention_structure import attention_rule
from .coverage import coverage_lines, unswitched_attention
from .fuse_report import FuseReport, FuseSettings, WeightGroups
from .handles import LoRAHandle
from .comfy_key_map import load_lora_patches
from .patching import FuseRun, install, make_switches
from ..klora_core.options import (FLIP_CACHE_AUTO, FLIP_CACHES, MEASURE_NOISE, MEASURES, MODE_AUTO, MODE_BAKE,
                                  MODE_BYPASS, MODE_CHOICES, MODE_LIVE, OUTSIDE_BOTH, OUTSIDE_CHOICES, OUTSIDE_STYLE,
                                  OUTSIDE_SUBJECT, SCOPE_ALL, SCOPE_ATTENTION, SCOPES)
from .bypass_hooks import install_bypass
from .modes import choose_mode
from .pair_scores import score_units
from .quantized import GGUF_LIVE_NOTE, host_live_weights, logical_shape, model_weight, storage_note
from .rebake import describe as describe_flips
from .units import expand, unify_layouts, unit_offset

logger = logging.getLogger(__name__)


@dataclass
class FuseResult:
    model: object
    report: str
    plan: object = None
    run: object = None
    stats: dict = field(default_factory=dict)


def model_family(model_patcher) -> str:
    config = getattr(model_patcher.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model_patcher.model).__name__


def _parse(handle: LoRAHandle, model_patcher):
    try:
        parsed = load_lora_patches(handle.state_dict, model_patcher)
    except KLoRAError:
        raise
    except Exception as exc:  # ComfyUI's parser assumes well-formed files (e.g. KeyError for an up without its down)
        raise KLoRAError(
            f"{handle.label()} ({handle.path}) could not be parsed as a LoRA ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the file is damaged or incomplete"
        ) from exc
    patches = parsed.patches
    if not patches:
        raise KLoRAError(
            f"{handle.label()} ({handle.path}) matched none of its {len(handle.state_dict)} tensors to the "
            f"{model_family(model_patcher)} model: it was trained for another model family or uses key names "
            "this pack does not know"
        )
    return patches, parsed.n_matched, parsed.n_unmatched


def _check_shapes(handle: LoRAHandle, patches: dict, model_patcher) -> None:
    """Every low-rank patch must fit the weight it targets (catches LoRAs for another family).

    Shapes are read from the parameters (their logical shape, :func:`.quantized.logical_shape`), not from
    ``model_state_dict()``, which holds packed placeholders for GGUF-quantized weights.
    """
    for unit, value in patches.items():
        name = weight_name(unit)
        factors = lora_factors(value)
        weight = model_weight(model_patcher, name) if factors is not None else None
        if weight is None or factors.reshape is not None:
            continue
        up, down, mid = factors.up, factors.down, factors.mid
        if up.dim() < 2 or down.dim() < 2 or up.flatten(1).shape[1] != down.shape[0]:
            raise KLoRAError(
                f"{handle.label()}: layer {display_key(unit)}: up {tuple(up.shape)} and down "
                f"{tuple(down.shape)} do not share a rank; the file is corrupt"
            )
        shape = logical_shape(weight)
        offset, _ = unit_offset(unit)
        rows = offset[2] if offset is not None and offset[0] == 0 else shape[0]
        cols = math.prod(shape[1:])
        if mid is None and (up.shape[0] != rows or down.flatten(1).shape[1] != cols):
            raise KLoRAError(
                f"{handle.label()}: layer {display_key(unit)}: LoRA delta {up.shape[0]}x{down.flatten(1).shape[1]} "
                f"does not fit {_target_text(offset, rows, cols, shape)}{storage_note(weight)}; the LoRA was "
                "trained for another model"
            )


def _target_text(offset, rows: int, cols: int, shape) -> str:
    """What a delta must fit: the weight, or its slice (a q/k/v part of a fused weight has its own width)."""
    if offset is None or offset[0] != 0:
        return f"the model weight of shape {tuple(shape)}"
    return f"rows {offset[1]}..{offset[1] + rows} ({rows}x{cols}) of the model weight of shape {tuple(shape)}"


def _model_order(model_sd: dict, units) -> list:
    order = {name: i for i, name in enumerate(model_sd)}

    def sort_key(unit):
        offset, _ = unit_offset(unit)
        return order.get(weight_name(unit), len(order)), (offset[1] if offset else -1)

    return sorted(units, key=sort_key)


def fuse_model(model_patcher, subject: LoRAHandle, style: LoRAHandle, alpha: float = 1.5, beta: float = -1.0,
               pattern: str = schedule.PATTERN_S, scope: str = SCOPE_ATTENTION, outside_scope: str = OUTSIDE_BOTH,
               progress_measure: str = MEASURE_NOISE, mode: str = MODE_AUTO,
               flip_cache: str = FLIP_CACHE_AUTO) -> FuseResult:
    """Return a clone of ``model_patcher`` that applies K-LoRA during sampling, and a text report.

    ``beta < 0`` means the pattern's paper default (s: 0.5, s*: 1.275).
    ``mode``: one of options.MODE_CHOICES (auto: chosen by :func:`.modes.choose_mode`).
    ``flip_cache``: kept variants auto / off / on, in bake mode (nodes/rebake.py).
    """
    if not isinstance(subject, LoRAHandle) or subject.role != "subject":
        raise KLoRAError("the subject input must come from a 'Load Subject LoRA' node")
    if not isinstance(style, LoRAHandle) or style.role != "style":
        raise KLoRAError("the style input must come from a 'Load Style LoRA' node")
    options.check_choice("scope", scope, SCOPES)
    options.check_choice("outside_scope", outside_scope, OUTSIDE_CHOICES)
    options.check_choice("progress_measure", progress_measure, MEASURES)
    options.check_choice("flip_cache", flip_cache, FLIP_CACHES)
    mode = options.check_choice("mode", MODE_AUTO if mode is None else mode, MODE_CHOICES)
    alpha, beta, pattern = options.check_schedule(alpha, beta, pattern)

    model_sd = model_patcher.model_state_dict()
    subject_patches, s_matched, s_unmatched = _parse(subject, model_patcher)
    style_patches, t_matched, t_unmatched = _parse(style, model_patcher)
    _check_shapes(subject, subject_patches, model_patcher)
    _check_shapes(style, style_patches, model_patcher)

    subject_patches, style_patches, merged = unify_layouts(subject_patches, style_patches)
    shared = _model_order(model_sd, [k for k in subject_patches if k in style_patches])
    subject_only = _model_order(model_sd, [k for k in subject_patches if k not in style_patches])
    style_only = _model_order(model_sd, [k for k in style_patches if k not in subject_patches])
    rule = attention_rule(model_patcher)
    switched = [k for k in shared if scope == SCOPE_ALL or rule.is_projection(k)]
    outside = [k for k in shared if k not in set(switched)]
    flagged = unswitched_attention(rule, outside)

    s_strength, t_strength = subject.strength, style.strength
    same_file = subject.sha256 == style.sha256
    notes = []
    plan = None
    run = None
    if s_strength == 0.0 or t_strength == 0.0:
        notes.append("one strength is 0: K-LoRA has nothing to balance, so every shared weight takes the other LoRA")
    elif not switched:
        raise KLoRAError(
            f"{subject.label()} and {style.label()} share no "
            + ("attention projection" if scope == SCOPE_ATTENTION else "weight")
            + f" of the {model_family(model_patcher)} model"
            + ("; set scope to 'all shared weights'" if shared else "; they were trained for different layers or models")
        )
    else:
        pbar = comfy.utils.ProgressBar(len(switched))
        details = score_units(switched, subject_patches, style_patches, model_patcher, subject, style,
                              progress=lambda done, total: pbar.update_absolute(done, total))
        try:
            plan = plan_from_scores(scores_at_strengths(details, s_strength, t_strength), subject_only, style_only,
                                    alpha, beta, pattern)
        except KLoRAError as exc:
            raise KLoRAError(f"{subject.label()} + {style.label()}: {exc}") from None
        plan = replace(plan, unswitched=tuple(display_key(k) for k in flagged))

    choice = None if plan is None else choose_mode(model_patcher, mode, plan.keys, subject_patches, style_patches,
                                                   subject, style)
    fused = model_patcher.clone() if choice is None else choice.patcher
    if subject_only:
        fused.add_patches(expand(subject_patches, subject_only), s_strength)
    if style_only:
        fused.add_patches(expand(style_patches, style_only), t_strength)
    if outside:
        if outside_scope in (OUTSIDE_BOTH, OUTSIDE_SUBJECT):
            fused.add_patches(expand(subject_patches, outside), s_strength)
        if outside_scope in (OUTSIDE_BOTH, OUTSIDE_STYLE):
            fused.add_patches(expand(style_patches, outside), t_strength)
    if plan is None:
        winner, strength = (style_patches, t_strength) if s_strength == 0.0 else (subject_patches, s_strength)
        fused.add_patches(expand(winner, switched), strength)
    else:
        # Bypass leaves every weight to its host, quantized or not: nothing is patched live for it.
        host_live = frozenset() if choice.mode == MODE_BYPASS else host_live_weights(fused, map(weight_name, switched))
        run = FuseRun(plan, progress_measure, choice.mode, host_live=host_live, flip_cache=flip_cache)
        install(fused, run, make_switches(plan.keys, subject_patches, style_patches, s_strength, t_strength, run))
        if choice.forms is not None:
            install_bypass(fused, choice.forms, run.tracker)
        if choice.mode == MODE_BAKE:
            baked = {weight_name(k) for k in plan.keys} - host_live
            if baked:
                notes.append(describe_flips(flip_cache, sum(model_sd[n].numel() * model_sd[n].element_size()
                                                            for n in baked), len(baked)))
    if merged:
        notes.append(f"{len(merged)} weights are covered by both files in different layouts (e.g. a fused qkv "
                     "and separate q/k/v): each is switched as one whole weight")
    notes[:0] = coverage_lines(rule, scope, switched, flagged, outside_scope, subject_only, style_only)
    if same_file:
        notes.append("subject and style are the same file: both deltas are identical, so the result equals one "
                     "LoRA whose strength follows the schedule")

    stats = {
        "subject_matched": s_matched, "subject_unmatched": s_unmatched,
        "style_matched": t_matched, "style_unmatched": t_unmatched,
        "switched": len(switched), "outside": len(outside),
        "subject_only": len(subject_only), "style_only": len(style_only),
        "unswitched_attention": len(flagged),
        "mode": None if choice is None else choice.mode,
    }
    if run is not None:
        notes.insert(0, _mode_line(run, {weight_name(k) for k in switched}, choice.reason))
    report = FuseReport(
        model_family=model_family(model_patcher), subject=subject, style=style, plan=plan, stats=stats, notes=notes,
        settings=FuseSettings(pattern, alpha, beta, scope, outside_scope, progress_measure),
        weights=WeightGroups(switched, outside, subject_only, style_only),
    ).text()
    logger.info("%s", report.splitlines()[0])
    return FuseResult(model=fused, report=report, plan=plan, run=run, stats=stats)


_MODE_TEXT = {
    MODE_BAKE: "bake: a weight is re-baked when its choice flips",
    MODE_LIVE: "live: the chosen delta is added at every forward (weight wrappers)",
    MODE_BYPASS: "bypass: weights untouched, the chosen LoRA is added at forward time",
}


def _mode_line(run: FuseRun, names: set, reason: str) -> str:
    """How the per-step choice reaches the weights and why (nodes/modes.py), for the report."""
    live = len(run.host_live & names)
    own = _MODE_TEXT[run.mode]
    if live == len(names):
        line = f"mode {GGUF_LIVE_NOTE}, reading the current choice (nothing to re-bake)"
    elif live:
        line = f"mode {own} ({len(names) - live} weights); {GGUF_LIVE_NOTE} ({live} weights)"
    else:
        line = f"mode {own}"
    return f"{line} ({reason})"
