# SPDX-License-Identifier: GPL-3.0-or-later
"""The "K-LoRA Fuse" node (ComfyUI V3 node API): model + subject + style -> fused model, report, map.

The work is :func:`.fuse.fuse_model`; this module only declares the node.
Node id, input names, input order and output order are stored in every saved
workflow: never change them (tests/test_saved_workflows.py runs the workflows
saved with 0.1.0).

Adding a setting is one entry in :func:`_settings_inputs`, named like the
:func:`.fuse.fuse_model` keyword it sets (``execute`` passes every setting
through by name).  Append it at the end, ``optional=True`` with a default:
a saved UI workflow stores its widget values by position, and a saved API
workflow lacks the new input, so it must not be required.
"""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..klora_core import options, schedule
from ..klora_core.errors import KLoRAError
from ..klora_core.options import (ALPHA, BETA, MEASURE_NOISE, MEASURES, OUTSIDE_BOTH, OUTSIDE_CHOICES,
                                  SCOPE_ATTENTION, SCOPES, STEPS)
from .fuse import fuse_model
from .selection_map import selection_map_outputs
from .sockets import CATEGORY, StyleLoRA, SubjectLoRA

logger = logging.getLogger(__name__)


def _settings_inputs() -> list:
    """The node's widgets, in the order saved workflows store their values (append only)."""
    return [
        io.Combo.Input("pattern", options=list(schedule.PATTERNS), default=schedule.PATTERN_S,
                       tooltip="How the style factor changes over sampling. 's' (paper's main results): "
                               "alpha*p+beta, subject early, style late. 's*' (paper's supplement, recommended "
                               "for FLUX): (alpha*p+beta) mod alpha, style first ~15%, then subject, then style."),
        io.Float.Input("alpha", default=ALPHA.default, min=ALPHA.lo, max=ALPHA.hi, step=ALPHA.step,
                       tooltip="Slope of the style factor over progress p (paper: 1.5). Higher favours the style "
                               "later in sampling; 0 removes the time dependence."),
        io.Float.Input("beta", default=BETA.default, min=BETA.lo, max=BETA.hi, step=BETA.step,
                       tooltip="Offset of the style factor. Higher favours the style. Paper values: 0.5 for s, "
                               "1.275 for s* (the pack's frontend switches between them with the pattern). "
                               "A negative value (0.1.0 workflows: -1) means the pattern's paper value. "
                               "alpha = beta = 0 selects the subject everywhere."),
        io.Combo.Input("scope", options=list(SCOPES), default=SCOPE_ATTENTION,
                       tooltip="Which weights K-LoRA switches: the attention projections (q, k, v, out) as in "
                               "the paper, or every weight both LoRAs cover."),
        io.Combo.Input("outside_scope", options=list(OUTSIDE_CHOICES), default=OUTSIDE_BOTH,
                       tooltip="Weights both LoRAs cover but outside the scope: apply both (like two "
                               "LoraLoaders), only the subject, only the style, or none (the authors' code)."),
        io.Combo.Input("progress_measure", display_name="progress", options=list(MEASURES), default=MEASURE_NOISE,
                       tooltip="How sampling progress p is measured: by noise level (exact fraction of the "
                               "schedule; right for img2img, split samplers, any scheduler) or by counting "
                               "steps within each sampling pass."),
        io.Int.Input("map_steps", default=STEPS.default, min=STEPS.lo, max=STEPS.hi, optional=True,
                     tooltip="Columns of the selection map. The pack's frontend keeps it at the steps of the "
                             "KSampler this node feeds; set it to override. Only the picture uses it; sampling "
                             "follows the sampler's real progress."),
        _advanced(io.Combo.Input(
            "mode", options=list(options.MODE_CHOICES), default=options.MODE_AUTO, optional=True,
            tooltip="How the chosen LoRA reaches each weight. auto: bake on ComfyUI's classic patcher, bypass "
                    "with dynamic VRAM. bake: re-bake weights when a choice flips (no cost per step). bypass: "
                    "weights untouched, the LoRA is added at forward time (plain and conv LoRAs only). live: "
                    "delta added at every forward (slowest). The report says which ran and why.")),
        _advanced(io.Combo.Input(
            "flip_cache", options=list(options.FLIP_CACHES), default=options.FLIP_CACHE_AUTO, optional=True,
            tooltip="Bake mode: keep both baked versions of every switched weight so a flip is a swap (extra "
                    "memory = the switched weights' size). auto: only when the device holding the weights has "
                    "that much free; off: re-bake at every flip (memory as a plain LoRA merge); on: always.")),
    ]


def _advanced(widget):
    """Mark a widget advanced (frontends that know the flag fold it away).  V3 inputs in ComfyUI 0.3.75
    and 0.8.0 take no ``advanced`` argument; ``extra_dict`` reaches ``/object_info`` unchanged."""
    widget.extra_dict["advanced"] = True
    return widget


class KLoRAFuse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KLoRAFuse",
            display_name="K-LoRA Fuse",
            category=CATEGORY,
            description="K-LoRA (CVPR 2025): for every attention weight and every sampling step, applies exactly "
                        "one of the two LoRAs, chosen by its top-K magnitude, a global balance and a "
                        "step-dependent style factor. No training.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the two LoRAs to."),
                SubjectLoRA.Input("subject", tooltip="From 'Load Subject LoRA'."),
                StyleLoRA.Input("style", tooltip="From 'Load Style LoRA'."),
                *_settings_inputs(),
            ],
            # Output ids must differ from input ids ("model"); the names users see are the display names.
            outputs=[
                io.Model.Output("fused_model", display_name="model",
                                tooltip="The model with K-LoRA applied during sampling."),
                io.String.Output("report", display_name="report",
                                 tooltip="gamma, how many weights take which LoRA at the first and last step, "
                                         "and which weights only one LoRA covers."),
                io.Image.Output("selection_map", display_name="selection_map",
                                tooltip="Which LoRA each weight (rows, model order) uses at each step (columns): "
                                        "blue = subject, orange = style."),
            ],
        )

    @classmethod
    def validate_inputs(cls, pattern, scope, outside_scope, progress_measure):
        """Refuse a bad choice before anything runs, on every ComfyUI version (0.3.75 does not check V3 combo
        values itself), with the words :func:`.fuse.fuse_model` would use.  A choice added later is checked
        by ComfyUI (0.8 and newer) and by fuse_model when the node runs."""
        try:
            for name, value, choices in (("pattern", pattern, schedule.PATTERNS), ("scope", scope, SCOPES),
                                         ("outside_scope", outside_scope, OUTSIDE_CHOICES),
                                         ("progress_measure", progress_measure, MEASURES)):
                options.check_choice(name, value, choices)
        except KLoRAError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model, subject, style, map_steps=STEPS.default, **settings) -> io.NodeOutput:
        """``settings``: every other input, passed to :func:`.fuse.fuse_model` by name."""
        result = fuse_model(model, subject, style, **settings)
        map_steps = options.STEPS.check("map_steps", map_steps)
        image, ui_image = selection_map_outputs(result.plan, map_steps)
        ui = {"text": [result.report]}
        if ui_image is not None:
            ui["images"] = [ui_image]
        return io.NodeOutput(result.model, result.report, image, ui=ui)
