# SPDX-License-Identifier: GPL-3.0-or-later
"""argparse ``type=`` converters and usage errors shared by the ``map``/``inspect`` and ``run`` commands.

Each converter raises ``argparse.ArgumentTypeError`` with the message argparse
prints (``klora: error: argument --x: <message>``), so a bad value is exit
status 2.  Checks argparse cannot make (two options that only work together,
a value that depends on another) raise :class:`UsageError`, which
:func:`klora_core.cli.main.main` reports the same way, also with status 2.
"""
from __future__ import annotations

import argparse
import math

from .. import options
from ..errors import KLoRAError
from ..options import ALPHA, BETA, PATTERNS


class UsageError(KLoRAError):
    """The command line itself is wrong (exit status 2, like argparse's own errors); the message names
    the option with its dashes (``--width``)."""


def finite_number(text: str) -> float:
    """``text`` as a finite float (no nan/inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_in_range(lo: int, hi: int, what: str):
    """A converter of ``text`` to an int in ``[lo, hi]``; ``what`` (e.g. ``"--steps"``) names it in errors."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be between {lo} and {hi}, got {value}")
        return value
    return parse


def option_value(spec, what: str):
    """A converter of ``text`` to a value of the option ``spec`` (a :class:`klora_core.options.NumberRange`):
    the same range and the same message as the node and the preview route; ``what`` (``"--alpha"``) names it."""
    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if spec.integer and value.is_integer():
            value = int(value)
        try:
            return spec.check(what, value)
        except KLoRAError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def float_list(text: str) -> list:
    """``"1.0,1.5,2"`` as ``[1.0, 1.5, 2.0]``: at least one number, all finite (empty items are skipped)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def add_schedule_arguments(group) -> None:
    """``--pattern``, ``--alpha``, ``--beta``: the style-factor schedule, the same for ``map``, ``inspect`` and ``run``."""
    group.add_argument("--pattern", choices=list(PATTERNS), default=options.PATTERN_S,
                       help="style-factor schedule: s = alpha*p + beta (paper's main results), "
                            "s* = (alpha*p + beta) mod alpha (supplement; suits FLUX) (default s)")
    group.add_argument("--alpha", type=option_value(ALPHA, "--alpha"), default=ALPHA.default,
                       help=f"schedule slope, {ALPHA.lo:g}-{ALPHA.hi:g} (default {ALPHA.default:g})")
    group.add_argument("--beta", type=option_value(BETA, "--beta"), default=None,
                       help=f"schedule offset, 0-{BETA.hi:g}; higher gives the style more steps "
                            "(default: the pattern's paper value, 0.5 for s, 1.275 for s*; so does -1)")
