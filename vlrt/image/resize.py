"""The WebUI's three resize modes, for frames and masks, keeping the alpha channel.

The extension lost alpha in modes 1 and 2 because it pasted onto an RGB canvas; here the colour
and alpha planes are resized with the same geometry, separately.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vlrt.frames import Frame

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = 0, 1, 2


def resize_plane(image: Image.Image, width: int, height: int, mode: int, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize one Pillow image (RGB or L) to width×height with a WebUI resize mode."""
    if image.size == (width, height):
        return image
    if mode == JUST_RESIZE:
        return image.resize((width, height), resample)
    src_w, src_h = image.size
    if mode == CROP_AND_RESIZE:
        scale = max(width / src_w, height / src_h)
    elif mode == RESIZE_AND_FILL:
        scale = min(width / src_w, height / src_h)
    else:
        raise ValueError(f"unknown resize mode {mode}")
    new_w, new_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    scaled = image.resize((new_w, new_h), resample)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - new_w) // 2, (height - new_h) // 2
    canvas.paste(scaled, (left, top))
    if mode == RESIZE_AND_FILL:
        _stretch_edges(canvas, scaled, left, top)
    return canvas


def _stretch_edges(canvas: Image.Image, scaled: Image.Image, left: int, top: int) -> None:
    """Fill the borders around `scaled` (pasted at left, top) by stretching its outermost rows and columns."""
    width, height = canvas.size
    new_w, new_h = scaled.size
    right, bottom = width - left - new_w, height - top - new_h
    if left > 0:
        canvas.paste(scaled.crop((0, 0, 1, new_h)).resize((left, new_h)), (0, top))
    if right > 0:
        canvas.paste(scaled.crop((new_w - 1, 0, new_w, new_h)).resize((right, new_h)), (left + new_w, top))
    if top > 0:
        canvas.paste(canvas.crop((0, top, width, top + 1)).resize((width, top)), (0, 0))
    if bottom > 0:
        canvas.paste(canvas.crop((0, top + new_h - 1, width, top + new_h)).resize((width, bottom)), (0, top + new_h))


def resize_frame(frame: Frame, width: int, height: int, mode: int) -> Frame:
    """The frame at width×height: colour and alpha resized with the same geometry."""
    if frame.width == width and frame.height == height:
        return frame
    image = np.asarray(resize_plane(Image.fromarray(frame.image), width, height, mode))
    alpha = None
    if frame.alpha is not None:
        alpha = np.asarray(resize_plane(Image.fromarray(frame.alpha), width, height, mode))
    resized = frame.with_image(image)
    resized.alpha = alpha
    return resized
