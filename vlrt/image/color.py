"""Colour correction against loop drift (extension issue #7, SPEC.md §5).

Each loop pass feeds SD its own previous output, so a small colour bias of the model or VAE
compounds ("more red each loop"). Matching each SD result's colour histogram to an anchor picture
removes that bias every pass. The modes (`color_correction`): `none` (the extension's
behaviour), `original` (each frame's anchor is its own original input frame, which moves with
the content; recommended), `first` (every frame is anchored to the first input frame, what the
WebUI's colour-correction option amounted to under the extension).

Matching is done per channel in CIELAB, in float64 torch ops on the frame's device, with an sRGB↔CIELAB conversion
(IEC 61966-2-1 sRGB, D65 white, CIE 1976 L*a*b*). Not Pillow's ImageCms: its 8-bit LAB mode
quantises a* and b* to whole units and stores them as signed bytes, whose byte order is not
their value order, which a CDF match over byte values would scramble. LAB separates lightness
from the two colour axes, so matching channel by channel moves colour without the hue shifts
that per-channel RGB matching gives.
"""

from __future__ import annotations

from functools import lru_cache

import torch

NONE = "none"
ORIGINAL = "original"
FIRST = "first"
COLOR_MODES = (NONE, ORIGINAL, FIRST)

_RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_WHITE = _RGB_TO_XYZ.sum(dim=1)  # D65, the XYZ of sRGB white
_DELTA = 6 / 29


def _decode(c: torch.Tensor) -> torch.Tensor:
    """sRGB transfer function: encoded 0–1 to linear light 0–1."""
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_LINEAR = _decode(torch.arange(256, dtype=torch.float64) / 255.0)  # every 8-bit code's linear value
_LINEAR_EDGES = _decode((torch.arange(255, dtype=torch.float64) + 0.5) / 255.0)  # linear values halfway (in sRGB) between codes


@lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """The conversion's constants on `device`, copied there once (every frame of every pass uses them)."""
    return tuple(t.to(device) for t in (_LINEAR, _RGB_TO_XYZ.T, _WHITE, _XYZ_TO_RGB.T, _LINEAR_EDGES))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 sRGB (..., 3) to float64 CIELAB (..., 3): L* 0–100, a* and b* roughly ±128."""
    linear, to_xyz, white, _, _ = _tables(rgb.device)
    t = (linear[rgb.long()] @ to_xyz) / white
    f = torch.where(t > _DELTA**3, t.clamp(min=0) ** (1 / 3), t / (3 * _DELTA**2) + 4 / 29)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Float CIELAB (..., 3) to uint8 sRGB, out-of-gamut colours clipped.

    The nearest 8-bit code is found by comparing linear values with the codes' midpoints, which
    equals encoding and rounding, without a power function per pixel.
    """
    _, _, white, to_rgb, edges = _tables(lab.device)
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], dim=-1)
    t = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29))
    return torch.searchsorted(edges, ((t * white) @ to_rgb).contiguous()).to(torch.uint8)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy's `interp` for increasing `xp`: piecewise linear, constant beyond the ends.

    Written here because torch has no 1-D interpolation at given points."""
    if xp.numel() == 1:
        return fp.expand_as(x)
    i = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    y = (y1 - y0) / (x1 - x0) * (x - x0) + y0
    return torch.where(x <= xp[0], fp[0], torch.where(x >= xp[-1], fp[-1], y))


class ColorAnchor:
    """A reference picture's per-channel CIELAB value distribution, to match other pictures to.

    Built once per anchor (a frame's original input, or the first input frame for
    `color_correction = "first"`), used by every loop pass. Tensors live on the picture's device.
    """

    def __init__(self, rgb: torch.Tensor) -> None:
        lab = rgb_to_lab(rgb).reshape(-1, 3)
        self.channels = []
        for ch in range(3):
            values, counts = torch.unique(lab[:, ch], return_counts=True)
            self.channels.append((values, torch.cumsum(counts, 0).double() / lab.shape[0]))

    def match(self, image: torch.Tensor) -> torch.Tensor:
        """`image` with each LAB channel's CDF mapped onto the anchor's (classic histogram matching)."""
        lab = rgb_to_lab(image).reshape(-1, 3)
        out = torch.empty_like(lab)
        for ch, (ref_values, ref_cdf) in enumerate(self.channels):
            _, inverse, counts = torch.unique(lab[:, ch], return_inverse=True, return_counts=True)
            cdf = torch.cumsum(counts, 0).double() / lab.shape[0]
            out[:, ch] = _interp(cdf, ref_cdf.to(cdf.device), ref_values.to(cdf.device))[inverse]
        return lab_to_rgb(out.reshape(image.shape))


def match_histograms(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """uint8 RGB `image` recoloured so that each CIELAB channel's histogram matches `reference`'s.

    The two pictures may differ in size; only the value distributions are compared.
    """
    return ColorAnchor(reference).match(image)
