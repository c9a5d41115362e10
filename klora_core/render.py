"""Pictures and tables of a K-LoRA plan: which delta each weight uses at each step.

:func:`render_selection_map` draws a grid (rows = weights in model order,
grouped by block; columns = sampling steps) in two colour-blind-safe colours
of the Okabe-Ito palette: blue ``#0072B2`` = subject delta, orange ``#E69F00``
= style delta.  :func:`selection_table` gives the same information as text.

Pillow is imported lazily (it ships with ComfyUI).  Cells are drawn as solid
rectangles without antialiasing, so every pixel of a cell has exactly its
colour; the geometry is stored in the PNG text chunk ``klora:grid`` (JSON) and
in ``image.info["klora:grid"]`` so tools and tests can read the cells back.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Callable, Optional

from .errors import KLoRAError
from .weight_keys import WRAPPER_PREFIX, block_of, display_key

log = logging.getLogger(__name__)

SUBJECT_COLOR = "#0072B2"  # Okabe-Ito blue
STYLE_COLOR = "#E69F00"  # Okabe-Ito orange
_BG = (255, 255, 255)
_INK = (25, 25, 25)
_MUTED = (110, 110, 110)
_BAND = (232, 232, 232)
_RULE = (170, 170, 170)
_PAD = 14
_MAX_LABEL_PX = 250



def _rgb(hex_color: str) -> tuple:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))


def default_group(key: str) -> str:
    """Block of a weight key (:func:`klora_core.weight_keys.block_of`, the one grouping rule).

    ``down_blocks_1_attentions_0_..._to_q`` -> ``down_blocks_1``;
    ``diffusion_model.input_blocks.4.1....`` -> ``input_blocks.4``;
    ``double_blocks.3.img_attn.qkv.weight`` -> ``double_blocks.3``;
    ``noise_refiner.0.attention.qkv.weight`` -> ``noise_refiner.0``.
    """
    return block_of(key)


def default_label(key: str, group: str) -> str:
    """Short row label: the key without its group part, ``.weight`` and wrapper prefixes."""
    name = WRAPPER_PREFIX.sub("", key)
    if group and name.startswith(group):
        name = name[len(group):]
    name = re.sub(r"\.weight$", "", name).strip("._")
    name = re.sub(r"attentions[._](\d+)", r"a\1", name)
    name = re.sub(r"transformer_blocks[._](\d+)", r"tb\1", name)
    return name or key


def _counts(selection: dict, step: int) -> tuple:
    subject = sum(1 for v in selection.values() if v[step])
    return subject, len(selection) - subject


def _schedule_text(plan) -> str:
    if plan.pattern == "s*":
        return "scale(p) = (alpha*p + beta) mod alpha"
    return "scale(p) = alpha*p + beta"


def selection_table(plan, steps: int) -> str:
    """Plain-text table of ``plan`` over ``steps`` steps (step ``i`` has progress ``i / steps``).

    One line per weight: key, ``T_S``, ``T_T``, ``T_S / (gamma * T_T)`` (the
    weight uses the subject delta while ``scale(p)`` is below this) and the
    choice per step as a string (``S`` = subject, ``T`` = style).  Ends with
    the subject/style counts at the first and last step.
    """
    selection = plan.selection(steps)
    keys = list(selection)
    width = max([len("weight")] + [len(k) for k in keys])
    lines = [
        f"K-LoRA selection: gamma={plan.gamma:.6g} alpha={plan.alpha:g} beta={plan.beta:g} "
        f"pattern={plan.pattern} steps={steps} weights={len(keys)}",
        f"rule: subject at step i iff T_S / gamma > T_T * scale(i/{steps}); {_schedule_text(plan)}",
        f"{'weight':<{width}}  {'T_S':>11}  {'T_T':>11}  {'T_S/(g*T_T)':>11}  steps (S=subject, T=style)",
    ]
    for key in keys:
        t_s, t_t = plan.scores[key]
        ratio = t_s / (plan.gamma * t_t) if t_t > 0 else float("inf")
        marks = "".join("S" if c else "T" for c in selection[key])
        lines.append(f"{key:<{width}}  {t_s:>11.5g}  {t_t:>11.5g}  {ratio:>11.5g}  {marks}")
    for label, step in (("first", 0), ("last", steps - 1)):
        s, t = _counts(selection, step)
        lines.append(f"{label} step (i={step}): {s} subject, {t} style")
    lines.append(f"only in subject LoRA: {len(plan.subject_only)}; only in style LoRA: {len(plan.style_only)} "
                 "(applied as plain LoRAs, not scheduled)")
    return "\n".join(lines) + "\n"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError, ImportError, AttributeError):
        return ImageFont.load_default()


class _Text:
    """Measure and fit strings for one font."""

    def __init__(self, size: int):
        from PIL import Image, ImageDraw

        self.font = _font(size)
        self._draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(self, text: str) -> tuple:
        left, top, right, bottom = self._draw.textbbox((0, 0), text, font=self.font)
        return right - left, bottom - top

    def fit(self, text: str, max_px: int) -> str:
        if self.size(text)[0] <= max_px:
            return text
        while len(text) > 1 and self.size("..." + text)[0] > max_px:
            text = text[1:]
        return "..." + text


def _rows(plan, group_fn: Optional[Callable[[str], str]]) -> list:
    """``[("group", name) | ("weight", key)]`` in plan key order; a header where the group changes."""
    group_fn = group_fn or default_group
    rows, current = [], object()
    for key in plan.keys:
        group = str(group_fn(key))
        if group != current:
            rows.append(("group", group))
            current = group
        rows.append(("weight", key, group))
    return rows


def _short_names(keys, limit: int = 2) -> str:
    keys = [display_key(k) for k in keys]
    names = ", ".join(f"{block_of(k)} {default_label(k, block_of(k))}" for k in keys[:limit])
    return names + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _coverage_footer(plan) -> list:
    """Footer lines for what the grid does not show: one-sided weights, and attention left unswitched."""
    lines = []
    if plan.subject_only or plan.style_only:
        lines.append(f"not shown: {len(plan.subject_only)} weights only in the subject LoRA, "
                     f"{len(plan.style_only)} only in the style LoRA (applied as plain LoRAs)")
        for label, keys in (("subject", plan.subject_only), ("style", plan.style_only)):
            if keys:
                lines.append(f"    only in the {label} LoRA: {_short_names(keys)}")
    unswitched = getattr(plan, "unswitched", ())
    if unswitched:
        lines.append(f"NOT SWITCHED: {len(unswitched)} shared attention-like weights outside the scope: "
                     f"{_short_names(unswitched)}")
    return lines


def render_selection_map(plan, steps: int, path=None, title: Optional[str] = None,
                         group_fn: Optional[Callable[[str], str]] = None):
    """Draw the subject/style choice of every weight at every step; return a ``PIL.Image`` (RGB).

    Args:
        plan: a :class:`~klora_core.plan.KLoRAPlan`.
        steps: number of sampling steps (columns); step ``i`` has progress ``i / steps``.
        path: if given, the image is saved there (PNG keeps the ``klora:grid`` metadata).
        title: first title line (default "K-LoRA selection map"); a second line
            always states gamma, alpha, beta, pattern and steps.
        group_fn: ``key -> block name`` for the group headers (default :func:`default_group`).

    Layout: up to ~120 rows, every weight row is 12 px high and labelled,
    with a shaded header row per block; larger plans get 2-8 px rows, block
    separators and block names only.  Columns are 1-28 px wide (28 px for up
    to 20 steps).  The size therefore grows with the plan: about 620 x 900 px
    for the 56-weight demo at 20 steps.
    """
    from PIL import Image, ImageDraw

    selection = plan.selection(steps)
    rows = _rows(plan, group_fn)
    n_weights = len(selection)
    n_groups = sum(1 for r in rows if r[0] == "group")
    detailed = n_weights + n_groups <= 120

    big, normal, small = _Text(15), _Text(12), _Text(10)
    pitch_x = max(1, min(28, 640 // steps))
    gap_x = 1 if pitch_x >= 6 else 0
    if detailed:
        pitch_y, gap_y, group_h = 12, 1, 16
    else:
        pitch_y = max(2, min(8, 900 // max(n_weights, 1)))
        gap_y, group_h = (1 if pitch_y >= 5 else 0), 5
    cell_w, cell_h = pitch_x - gap_x, pitch_y - gap_y

    labels = []
    for row in rows:
        if row[0] == "group":
            labels.append(small.fit(row[1], _MAX_LABEL_PX))
        elif detailed:
            labels.append(small.fit(default_label(row[1], row[2]), _MAX_LABEL_PX))
    label_w = max([small.size(t)[0] for t in labels] + [40]) + 18
    yaxis_w = normal.size("weight")[1] + 10

    heading = title or "K-LoRA selection map"
    params = (f"gamma = {plan.gamma:.4g}    alpha = {plan.alpha:g}    beta = {plan.beta:g}    "
              f"pattern {plan.pattern}    {steps} steps    {n_weights} weights")
    rule = f"subject delta at step i iff T_S / gamma > T_T * scale(i/{steps});  {_schedule_text(plan)}"
    first, last = _counts(selection, 0), _counts(selection, steps - 1)
    footer = [f"first step (i=0): {first[0]} subject, {first[1]} style;   "
              f"last step (i={steps - 1}): {last[0]} subject, {last[1]} style"]
    footer += _coverage_footer(plan)

    x0 = _PAD + yaxis_w + label_w
    y = _PAD
    title_y, y = y, y + big.size(heading)[1] + 8
    params_y, y = y, y + normal.size(params)[1] + 6
    rule_y, y = y, y + small.size(rule)[1] + 10
    swatch = 14
    legend_y, y = y, y + swatch + 12
    grid_y0 = y
    grid_h = sum(group_h if r[0] == "group" else pitch_y for r in rows)
    grid_w = steps * pitch_x
    tick_y = grid_y0 + grid_h + 4
    xlabel_y = tick_y + 6 + small.size("0")[1] + 6
    footer_y = xlabel_y + normal.size("sampling step")[1] + 10
    height = footer_y + sum(small.size(t)[1] + 5 for t in footer) + _PAD
    text_w = max(big.size(heading)[0], normal.size(params)[0], small.size(rule)[0],
                 *(small.size(t)[0] for t in footer))
    width = max(x0 + grid_w + _PAD, _PAD + text_w + _PAD, 360)

    image = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(image)
    draw.text((_PAD, title_y), heading, fill=_INK, font=big.font)
    draw.text((_PAD, params_y), params, fill=_INK, font=normal.font)
    draw.text((_PAD, rule_y), rule, fill=_MUTED, font=small.font)

    legend = {}
    lx = _PAD
    for role, color, text in (("subject", SUBJECT_COLOR, "subject delta (S)"), ("style", STYLE_COLOR, "style delta (T)")):
        draw.rectangle([lx, legend_y, lx + swatch - 1, legend_y + swatch - 1], fill=_rgb(color))
        legend[role] = [lx, legend_y, swatch, swatch]
        draw.text((lx + swatch + 6, legend_y + 1), text, fill=_INK, font=normal.font)
        lx += swatch + 6 + normal.size(text)[0] + 24

    subject_rgb, style_rgb = _rgb(SUBJECT_COLOR), _rgb(STYLE_COLOR)
    cell_rows = []
    y = grid_y0
    last_label_bottom = -1
    label_iter = iter(labels)
    for row in rows:
        if row[0] == "group":
            text = next(label_iter)
            if detailed:
                draw.rectangle([_PAD + yaxis_w, y, x0 + grid_w - 1, y + group_h - 2], fill=_BAND)
                draw.text((_PAD + yaxis_w + 3, y + 2), text, fill=_INK, font=small.font)
            else:
                draw.line([_PAD + yaxis_w, y + group_h // 2, x0 + grid_w - 1, y + group_h // 2], fill=_RULE)
                if y >= last_label_bottom:
                    draw.text((_PAD + yaxis_w + 3, y + group_h // 2 + 1), text, fill=_INK, font=small.font)
                    last_label_bottom = y + group_h // 2 + small.size(text)[1] + 3
            y += group_h
            continue
        key = row[1]
        if detailed:
            draw.text((_PAD + yaxis_w + 10, y), next(label_iter), fill=_INK, font=small.font)
        for i, choice in enumerate(selection[key]):
            x = x0 + i * pitch_x
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=subject_rgb if choice else style_rgb)
        cell_rows.append([key, y])
        y += pitch_y

    # x axis: ticks at cell centres, labelled every k steps so labels never touch.
    widest = small.size(str(steps - 1))[0] + 8
    k = next(k for k in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10**9) if k * pitch_x >= widest)
    for i in range(0, steps, k):
        cx = x0 + i * pitch_x + cell_w // 2
        draw.line([cx, tick_y - 3, cx, tick_y], fill=_MUTED)
        tw = small.size(str(i))[0]
        draw.text((cx - tw // 2, tick_y + 2), str(i), fill=_INK, font=small.font)
    xlabel = "sampling step i  (progress p = i / N)"
    draw.text((x0 + max(0, (grid_w - normal.size(xlabel)[0]) // 2), xlabel_y), xlabel, fill=_INK, font=normal.font)

    # y axis label, rotated.
    tw, th = normal.size("weight")
    tmp = Image.new("L", (tw + 4, th + 6), 0)
    ImageDraw.Draw(tmp).text((2, 0), "weight", fill=255, font=normal.font)
    rotated = tmp.rotate(90, expand=True)
    image.paste(Image.new("RGB", rotated.size, _INK), (_PAD, grid_y0 + max(0, (grid_h - rotated.size[1]) // 2)), rotated)

    fy = footer_y
    for text in footer:
        draw.text((_PAD, fy), text, fill=_INK, font=small.font)
        fy += small.size(text)[1] + 5

    grid = {
        "version": 1,
        "steps": steps,
        "x0": x0,
        "pitch_x": pitch_x,
        "cell_w": cell_w,
        "cell_h": cell_h,
        "rows": cell_rows,
        "legend": legend,
        "colors": {"subject": SUBJECT_COLOR, "style": STYLE_COLOR},
    }
    image.info["klora:grid"] = json.dumps(grid, separators=(",", ":"))
    if path is not None:
        save_png(image, path)
    return image


def save_png(image, path) -> None:
    """Save ``image`` keeping its ``klora:grid`` metadata (PNG only; other formats blur the colours)."""
    from PIL import PngImagePlugin

    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise KLoRAError(f"{path}: the selection map is written as PNG; use a .png file name")
    info = PngImagePlugin.PngInfo()
    if "klora:grid" in image.info:
        info.add_text("klora:grid", image.info["klora:grid"])
    try:
        image.save(path, format="PNG", pnginfo=info)
    except OSError as exc:
        raise KLoRAError(f"{path}: cannot write the image ({exc.strerror or exc})") from None
    log.info("wrote %s (%dx%d)", path, image.width, image.height)
