# SPDX-License-Identifier: GPL-3.0-or-later
"""The ``--grid`` contact sheet of ``python -m klora_core run``: every alpha x beta cell in one picture.

Each cell shows the rendered image and, beside it, that cell's selection map
(which LoRA each weight takes at each step): alpha and beta change *which
delta* is applied when, and the map shows that directly, where the image may
not (the demo's random-weight models render textured noise that looks alike
for every alpha and beta).

Pillow is imported only when a sheet is drawn (it ships with every ComfyUI).
"""
from __future__ import annotations

from pathlib import Path

#: The sheet's second title line: what a cell holds.
CELL_LEGEND = "each cell: the image | its selection map (rows = weights, columns = steps; blue subject, orange style)"


def short_number(x: float) -> str:
    """``x`` as file names and labels show it: ``1.5``, ``2``, ``-1`` (``%g``)."""
    return f"{x:g}"


def _fit(size: tuple, box_w: int, box_h: int) -> tuple:
    """``size`` scaled (never up) to fit ``box_w`` x ``box_h``, aspect ratio kept."""
    scale = min(1.0, box_w / size[0], box_h / size[1])
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale)), scale


def contact_sheet(cells: dict, alphas: list, betas: list, title: str, path: Path, cell_px: int = 256) -> Path:
    """Draw ``cells[(alpha, beta)] = (image PNG, selection map PNG or None)`` as a labelled grid.

    Rows are alphas, columns betas.  The image is scaled (never up) to fit
    ``cell_px`` on its longer side, at the aspect ratio of the first image;
    the map, when given, stands to its right, ``cell_px`` high (never scaled
    up; at least the image's height) at its own aspect ratio.  Returns ``path``
    (an RGB PNG).
    """
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pad, head_h, left_w, title_h = 8, 24, 92, 48
    first_image, first_map = next(iter(cells.values()))
    with Image.open(first_image) as im:
        cw, ch, scale = _fit(im.size, cell_px, cell_px)
    mw, mh = 0, ch
    if first_map is not None:
        with Image.open(first_map) as im:
            mh = max(ch, min(cell_px, im.size[1]))
            mw = max(1, int(im.size[0] * mh / im.size[1]))
    block_w = cw + (pad + mw if mw else 0)
    row_h = max(ch, mh)
    width = left_w + len(betas) * (block_w + pad) + pad
    height = title_h + head_h + len(alphas) * (row_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), title, fill=(25, 25, 25), font=font)
    if mw:
        draw.text((pad, 26), CELL_LEGEND, fill=(90, 90, 90), font=font)
    for j, b in enumerate(betas):
        draw.text((left_w + j * (block_w + pad) + 4, title_h + 4), f"beta = {short_number(b)}",
                  fill=(25, 25, 25), font=font)
    for i, a in enumerate(alphas):
        y = title_h + head_h + i * (row_h + pad)
        draw.text((pad, y + row_h // 2 - 8), f"alpha = {short_number(a)}", fill=(25, 25, 25), font=font)
        for j, b in enumerate(betas):
            x = left_w + j * (block_w + pad)
            image_path, map_path = cells[(a, b)]
            with Image.open(image_path) as im:
                im = im.convert("RGB").resize((cw, ch), Image.NEAREST if scale >= 1 else Image.BILINEAR)
                sheet.paste(im, (x, y))
            if mw and map_path is not None:
                with Image.open(map_path) as im:
                    sheet.paste(im.convert("RGB").resize((mw, mh), Image.LANCZOS), (x + cw + pad, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
