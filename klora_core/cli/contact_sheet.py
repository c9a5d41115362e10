# SPDX-License-Identifier: GPL-3.0-or-later
"""The ``--grid`` contact sheet of ``python -m klora_core run``: one picture of every alpha x beta image.

Pillow is imported only when a sheet is drawn (it ships with every ComfyUI).
"""
from __future__ import annotations

from pathlib import Path


def short_number(x: float) -> str:
    """``x`` as file names and labels show it: ``1.5``, ``2``, ``-1`` (``%g``)."""
    return f"{x:g}"


def contact_sheet(cells: dict, alphas: list, betas: list, title: str, path: Path, cell_px: int = 256) -> Path:
    """Draw ``cells[(alpha, beta)] = PNG path`` as a labelled grid (rows alpha, columns beta).

    Every cell is scaled (never up) to fit ``cell_px`` pixels on its longer side, at the aspect
    ratio of the first image; a beta of -1 is labelled "beta default".  Returns ``path`` (an RGB PNG).
    """
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pad, head_h, left_w, title_h = 8, 24, 92, 30
    first = Image.open(next(iter(cells.values())))
    scale = min(1.0, cell_px / max(first.size))
    cw, ch = max(1, int(first.size[0] * scale)), max(1, int(first.size[1] * scale))
    width = left_w + len(betas) * (cw + pad) + pad
    height = title_h + head_h + len(alphas) * (ch + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), title, fill=(25, 25, 25), font=font)
    for j, b in enumerate(betas):
        label = "beta default" if b == -1.0 else f"beta = {short_number(b)}"
        draw.text((left_w + j * (cw + pad) + 4, title_h + 4), label, fill=(25, 25, 25), font=font)
    for i, a in enumerate(alphas):
        y = title_h + head_h + i * (ch + pad)
        draw.text((pad, y + ch // 2 - 8), f"alpha = {short_number(a)}", fill=(25, 25, 25), font=font)
        for j, b in enumerate(betas):
            with Image.open(cells[(a, b)]) as im:
                im = im.convert("RGB").resize((cw, ch), Image.NEAREST if scale >= 1 else Image.BILINEAR)
                sheet.paste(im, (left_w + j * (cw + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
