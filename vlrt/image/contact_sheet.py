"""Labelled grids of frames, for render previews and parameter sweeps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

LABEL_HEIGHT = 14
GAP = 2
MIN_CELL_WIDTH = 96


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], column_labels: Sequence[str]) -> Image.Image:
    """A grid: one row per label, one column per frame; frames narrower than 96 px are enlarged
    (nearest neighbour, whole factors) so that small renders stay visible and labels fit."""
    cell_h, cell_w = rows[0][0].shape[:2]
    scale = max(1, -(-MIN_CELL_WIDTH // cell_w))
    cell_h, cell_w = cell_h * scale, cell_w * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max((measure.textlength(s) for s in row_labels), default=0)) + 8
    width = label_w + len(column_labels) * (cell_w + GAP)
    height = LABEL_HEIGHT + len(rows) * (cell_h + GAP)
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(column_labels):
        draw.text((label_w + c * (cell_w + GAP) + 2, 1), label, fill=(230, 230, 230))
    for r, (label, cells) in enumerate(zip(row_labels, rows)):
        top = LABEL_HEIGHT + r * (cell_h + GAP)
        draw.text((2, top + cell_h // 2 - 5), label, fill=(230, 230, 230))
        for c, cell in enumerate(cells):
            picture = Image.fromarray(cell)
            if scale > 1:
                picture = picture.resize((cell_w, cell_h), Image.Resampling.NEAREST)
            sheet.paste(picture, (label_w + c * (cell_w + GAP), top))
    return sheet
