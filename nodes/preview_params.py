# SPDX-License-Identifier: GPL-3.0-or-later
"""Parameters of the ``/klora/preview`` route: validation into :class:`PreviewParams`.

Pure Python (ComfyUI's ``folder_paths`` is imported only when no list of LoRA
file names is given); the HTTP handlers are in ``nodes/routes.py``.

Request (GET query string, or POST with a JSON object body):

============== ==================================================
parameter      meaning (ranges and defaults: ``klora_core/options.py``, the same as the node's)
============== ==================================================
subject        required: file name as listed in ComfyUI's loras folder
style          required: file name as listed in ComfyUI's loras folder
subject_strength  as "Load Subject LoRA"'s strength
style_strength as "Load Style LoRA"'s strength
alpha, beta    as K-LoRA Fuse's (beta omitted or negative = the pattern's paper value)
pattern        "s" or "s*"
scope          "attention projections" or "all shared weights"
map_steps      as K-LoRA Fuse's map_steps (columns)
============== ==================================================

Every problem is a :class:`PreviewRequestError`: HTTP 400 with ``{"error":
{"type", "param", "message"}}``, ``type`` ``invalid_parameter`` or
``unknown_lora``.  Query-string values are text; JSON values keep their types
(a JSON ``true`` is not a number, ``2.0`` is an integer).
"""
from __future__ import annotations

import json
import math
import ntpath
import posixpath
from dataclasses import dataclass
from typing import Optional

from ..klora_core import options, schedule
from ..klora_core.options import ALPHA, BETA, SCOPE_ATTENTION, SCOPES, STEPS, STRENGTH

MAX_NAME_CHARS = 1024

PARAMS = ("subject", "style", "subject_strength", "style_strength", "alpha", "beta", "pattern", "scope",
          "map_steps")


class PreviewRequestError(Exception):
    """A bad request parameter (HTTP 400)."""

    def __init__(self, param, message, status=400, kind="invalid_parameter"):
        super().__init__(message)
        self.param = param
        self.message = message
        self.status = status
        self.kind = kind

    def payload(self) -> dict:
        error = {"type": self.kind, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


@dataclass(frozen=True)
class PreviewParams:
    """A valid preview request: two LoRA file names, strengths (factors on each delta), the schedule
    (alpha, beta None or < 0 = the pattern's paper value, see :attr:`resolved_beta`), scope and map_steps
    (columns)."""

    subject: str
    style: str
    subject_strength: float = STRENGTH.default
    style_strength: float = STRENGTH.default
    alpha: float = ALPHA.default
    beta: Optional[float] = None
    pattern: str = schedule.PATTERN_S
    scope: str = SCOPE_ATTENTION
    map_steps: int = STEPS.default

    @property
    def resolved_beta(self) -> float:
        return options.resolve_beta(self.beta, self.pattern)


# ---------------------------------------------------------------- validation


def _lora_names() -> list:
    """The LoRA file names ComfyUI lists (its ``loras`` folders, relative paths)."""
    import folder_paths

    return list(folder_paths.get_filename_list("loras"))


def _check_name(param: str, value, names) -> str:
    """``value`` when it is one of ``names``: a plain relative name (no absolute path, ``~`` or ``..``)."""
    if value is None:
        raise PreviewRequestError(param, f"{param} is required: the name of a LoRA file in ComfyUI's loras folder")
    if not isinstance(value, str):
        raise PreviewRequestError(param, f"{param} must be a string (a LoRA file name), got {type(value).__name__}")
    if not value.strip():
        raise PreviewRequestError(param, f"{param} must not be empty")
    if len(value) > MAX_NAME_CHARS or "\x00" in value:
        raise PreviewRequestError(param, f"{param} is not a valid file name")
    if posixpath.isabs(value) or ntpath.isabs(value) or ntpath.splitdrive(value)[0] or value.startswith("~"):
        raise PreviewRequestError(param, f"{param} must be a name from ComfyUI's loras folder, not an absolute path")
    if any(part == ".." for part in value.replace("\\", "/").split("/")):
        raise PreviewRequestError(param, f"{param} must be a name from ComfyUI's loras folder; '..' is not allowed")
    if value not in names:
        raise PreviewRequestError(
            param, f"{param}: '{value}' is not in ComfyUI's loras folder (put the file there and refresh)",
            kind="unknown_lora")
    return value


def _check_number(param: str, value, spec: options.NumberRange, from_query: bool) -> float:
    """``value`` as a finite float in the option's range (its default when absent); text only from a query string."""
    lo, hi = spec.lo, spec.hi
    if value is None:
        return spec.default
    if isinstance(value, bool):
        raise PreviewRequestError(param, f"{param} must be a number, got {json.dumps(value)}")
    if isinstance(value, str) and from_query:
        try:
            number = float(value.strip())
        except ValueError:
            raise PreviewRequestError(param, f"{param} must be a number, got {value[:40]!r}") from None
    elif isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer beyond float range (e.g. 10**400)
            number = math.inf if value > 0 else -math.inf
    else:
        raise PreviewRequestError(param, f"{param} must be a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise PreviewRequestError(param, f"{param} must be a finite number, got {value!r}")
    if not lo <= number <= hi:
        raise PreviewRequestError(param, f"{param} must be between {lo:g} and {hi:g}, got {number:g}")
    return number


def _check_int(param: str, value, spec: options.NumberRange, from_query: bool) -> int:
    """``value`` as an int in the option's range (its default when absent); a JSON float only when integral."""
    lo, hi = spec.lo, spec.hi
    if value is None:
        return spec.default
    if isinstance(value, bool):
        raise PreviewRequestError(param, f"{param} must be an integer, got {json.dumps(value)}")
    if isinstance(value, str) and from_query:
        text = value.strip()
        try:  # int() itself decides: "+-1" passes an isdigit() pre-check, "\u00b2" too, and both raise here
            number = int(text) if text.isascii() else None
        except ValueError:
            number = None
        if number is None:
            raise PreviewRequestError(param, f"{param} must be an integer, got {value[:40]!r}")
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        raise PreviewRequestError(param, f"{param} must be an integer, got {value!r}"[:120])
    if not lo <= number <= hi:
        raise PreviewRequestError(param, f"{param} must be between {lo} and {hi}, got {number}")
    return number


def _check_choice(param: str, value, default: str, choices) -> str:
    """``value`` when it is one of ``choices`` (``default`` when absent)."""
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        shown = value[:40] if isinstance(value, str) else value
        raise PreviewRequestError(
            param, f"{param} must be one of {', '.join(repr(c) for c in choices)}, got {shown!r}")
    return value


def parse_params(raw, from_query: bool, names=None) -> PreviewParams:
    """Validate a request's parameters (query dict or JSON object) into :class:`PreviewParams`.

    Raises PreviewRequestError (param + clear message) on the first problem.
    ``names`` defaults to ComfyUI's list of LoRA files.
    """
    if not isinstance(raw, dict):
        raise PreviewRequestError(None, "the request body must be a JSON object")
    unknown = sorted(str(k) for k in raw if k not in PARAMS)
    if unknown:
        raise PreviewRequestError(
            unknown[0], f"unknown parameter(s) {', '.join(repr(u[:40]) for u in unknown[:5])}; "
                        f"accepted: {', '.join(PARAMS)}")
    names = set(_lora_names() if names is None else names)
    return PreviewParams(
        subject=_check_name("subject", raw.get("subject"), names),
        style=_check_name("style", raw.get("style"), names),
        subject_strength=_check_number("subject_strength", raw.get("subject_strength"), STRENGTH, from_query),
        style_strength=_check_number("style_strength", raw.get("style_strength"), STRENGTH, from_query),
        alpha=_check_number("alpha", raw.get("alpha"), ALPHA, from_query),
        beta=None if raw.get("beta") is None else _check_number("beta", raw.get("beta"), BETA, from_query),
        pattern=_check_choice("pattern", raw.get("pattern"), schedule.PATTERN_S, schedule.PATTERNS),
        scope=_check_choice("scope", raw.get("scope"), SCOPE_ATTENTION, SCOPES),
        map_steps=_check_int("map_steps", raw.get("map_steps"), STEPS, from_query),
    )
