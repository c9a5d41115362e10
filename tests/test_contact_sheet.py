"""The ``--grid`` contact sheet shows, beside each cell's image, that cell's selection map.

Before, the sheet held the images only: on the demo models (random weights)
nine cells that looked the same, although alpha and beta change which delta
each weight takes.  Here every cell's map is a solid colour of its own and
the test finds each colour in the sheet, right of its image, in its row
(alpha) and column (beta).
"""
from __future__ import annotations

import pytest

Image = pytest.importorskip("PIL.Image")

GRAY = (128, 128, 128)


def _boxes(sheet, color):
    """Bounding box ``(x0, y0, x1, y1)`` of the pixels exactly ``color``, or None."""
    from PIL import ImageChops

    difference = ImageChops.difference(sheet, Image.new("RGB", sheet.size, color)).convert("L")
    return difference.point(lambda v: 255 if v == 0 else 0).getbbox()


def test_every_cell_shows_its_map_beside_its_image(tmp_path):
    from klora_core.cli.contact_sheet import CELL_LEGEND, contact_sheet

    alphas, betas = [1.0, 2.0], [0.3, 0.5, 0.7]
    colors = {}
    cells = {}
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            image = tmp_path / f"img_{a}_{b}.png"
            Image.new("RGB", (64, 64), GRAY).save(image)
            color = (20 + 60 * j, 200 - 90 * i, 40 + 30 * i + 20 * j)
            colors[(a, b)] = color
            cells[(a, b)] = (image, tmp_path / f"map_{a}_{b}.png")
            Image.new("RGB", (300, 200), color).save(cells[(a, b)][1])
    sheet_path = contact_sheet(cells, alphas, betas, "title", tmp_path / "sheet.png", cell_px=128)
    sheet = Image.open(sheet_path).convert("RGB")
    boxes = {key: _boxes(sheet, color) for key, color in colors.items()}
    assert all(boxes.values()), boxes
    for (a, b), (x0, y0, x1, y1) in boxes.items():
        assert (x1 - x0) / (y1 - y0) == pytest.approx(1.5, abs=0.05)  # the map's own aspect ratio
        assert y1 - y0 >= 64  # never smaller than the image beside it
        # the cell's image is right before its map, on the same row
        assert sheet.getpixel((x0 - 12, y0 + 5)) == GRAY, (a, b)
    for a in alphas:  # columns: beta grows to the right; rows: alpha grows downwards
        xs = [boxes[(a, b)][0] for b in betas]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)
    for b in betas:
        ys = [boxes[(a, b)][1] for a in alphas]
        assert ys == sorted(ys) and len(set(ys)) == len(ys)
    assert "selection map" in CELL_LEGEND and "image" in CELL_LEGEND
