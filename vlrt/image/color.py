"""Colour correction against loop drift (extension issue #7, SPEC.md §5).

Each loop pass feeds SD its own previous output, so a small colour bias of the model or VAE
compounds ("more red each loop"). Matching each SD result's colour histogram to an anchor picture
removes that bias every pass. The modes (`color_correction`): `none` (the extension's
behaviour), `original` (each frame's anchor is its own original input frame, which moves with
the content; recommended), `first` (every frame is anchored to the first input frame, what the
WebUI's colour-correction option amounted to under the extension).

Matching is done per channel in CIELAB, in float, with a numpy sRGB↔CIELAB conversion
(IEC 61966-2-1 sRGB, D65 white, CIE 1976 L*a*b*). Not Pillow's ImageCms: its 8-bit LAB mode
quantises a* and b* to whole units and stores them as signed bytes, whose byte order is not
their value order, which a CDF match over byte values would scramble. LAB separates lightness
from the two colour axes, so matching channel by channel moves colour without the hue shifts
that per-channel RGB matching gives.
"""

from __future__ import annotations

import numpy as np

NONE = "none"
ORIGINAL = "original"
FIRST = "first"
COLOR_MODES = (NONE, ORIGINAL, FIRST)

_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = _RGB_TO_XYZ.sum(axis=1)  # D65, the XYZ of sRGB white
_DELTA = 6 / 29


def _decode(c: np.ndarray) -> np.ndarray:
    """sRGB transfer function: encoded 0–1 to linear light 0–1."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_LINEAR = _decode(np.arange(256) / 255.0)  # every 8-bit code's linear value
_LINEAR_EDGES = _decode((np.arange(255) + 0.5) / 255.0)  # linear values halfway (in sRGB) between codes


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB (..., 3) to float CIELAB (..., 3): L* 0–100, a* and b* roughly ±128."""
    t = (_LINEAR[rgb] @ _RGB_TO_XYZ.T) / _WHITE
    f = np.where(t > _DELTA**3, np.cbrt(t), t / (3 * _DELTA**2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Float CIELAB (..., 3) to uint8 sRGB, out-of-gamut colours clipped.

    The nearest 8-bit code is found by comparing linear values with the codes' midpoints, which
    equals encoding and rounding, without a power function per pixel.
    """
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    t = np.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29))
    linear = (t * _WHITE) @ _XYZ_TO_RGB.T
    return np.searchsorted(_LINEAR_EDGES, linear).astype(np.uint8)


class ColorAnchor:
    """A reference picture's per-channel CIELAB value distribution, to match other pictures to.

    Built once per anchor (a frame's original input, or the first input frame for
    `color_correction = "first"`), used by every loop pass.
    """

    def __init__(self, rgb: np.ndarray) -> None:
        lab = rgb_to_lab(rgb).reshape(-1, 3)
        self.channels = []
        for ch in range(3):
            values, counts = np.unique(lab[:, ch], return_counts=True)
            self.channels.append((values, np.cumsum(counts) / lab.shape[0]))

    def match(self, image: np.ndarray) -> np.ndarray:
        """`image` with each LAB channel's CDF mapped onto the anchor's (classic histogram matching)."""
        lab = rgb_to_lab(image).reshape(-1, 3)
        out = np.empty_like(lab)
        for ch, (ref_values, ref_cdf) in enumerate(self.channels):
            values, inverse, counts = np.unique(lab[:, ch], return_inverse=True, return_counts=True)
            cdf = np.cumsum(counts) / lab.shape[0]
            out[:, ch] = np.interp(cdf, ref_cdf, ref_values)[inverse.ravel()]
        return lab_to_rgb(out.reshape(image.shape))


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """uint8 RGB `image` recoloured so that each CIELAB channel's histogram matches `reference`'s.

    The two pictures may differ in size; only the value distributions are compared.
    """
    return ColorAnchor(reference).match(image)
