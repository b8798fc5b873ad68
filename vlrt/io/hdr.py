"""HDR video (PQ or HLG, BT.2020) tone-mapped to the BT.709 SDR pictures Stable Diffusion was trained on.

Relabelling HDR code values as BT.709 (what a plain RGB conversion does) shifts colours by tens
of levels and washes them out. The steps, each from a library made for it:

1. PyAV converts the decoded YUV to non-linear BT.2020 RGB in float, with the frame's own matrix.
2. colour-science's ST 2084 (PQ) or BT.2100 HLG EOTF gives display light in cd/m² (HLG on a
   1000 cd/m² display, its nominal peak).
3. colour-science's BT.2020 → BT.709 primaries matrix; out-of-gamut light is clipped at 0.
4. Light is scaled so that HDR reference white, 203 cd/m² (ITU-R BT.2408), is SDR's 1.0, and
   FFmpeg's `tonemap` filter (`mobius`: linear up to 0.3, highlights rolled off smoothly up to
   the 1000 cd/m² peak) brings it into 0…1.
5. colour-science's inverse BT.1886 EOTF (the BT.709 display's 2.4 gamma) gives 8-bit BT.709.

FFmpeg's `zscale` would do steps 2, 3 and 5 in one filter graph, but PyAV's FFmpeg has no zimg.
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import av
import numpy as np

PQ, HLG = 16, 18  # AVColorTransferCharacteristic: SMPTE ST 2084, ARIB STD-B67
NAMES = {PQ: "PQ", HLG: "HLG"}
REFERENCE_WHITE = 203.0  # cd/m², BT.2408
PEAK = 1000.0  # cd/m²: HLG's nominal display peak, and the mastering peak assumed for PQ


def hdr_transfer(stream: av.video.stream.VideoStream) -> int | None:
    """PQ or HLG when the stream is HDR, else None."""
    trc = stream.codec_context.color_trc
    return trc if trc in NAMES else None


def _colour():
    """colour-science, imported on first use without its notes about optional plotting packages."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import colour
    return colour


class ToneMapper:
    """HDR frames of one transfer (PQ or HLG) to 8-bit BT.709 SDR RGB."""

    def __init__(self, transfer: int) -> None:
        colour = _colour()
        self._colour = colour
        self._transfer = transfer
        spaces = colour.RGB_COLOURSPACES
        self._to_709 = colour.matrix_RGB_to_RGB(spaces["ITU-R BT.2020"], spaces["ITU-R BT.709"]).astype(np.float32)
        self._graph: av.filter.Graph | None = None
        self._size: tuple[int, int] | None = None
        self._count = 0

    def _light(self, signal: np.ndarray) -> np.ndarray:
        """Display light in cd/m² of non-linear BT.2020 RGB."""
        models = self._colour.models
        if self._transfer == PQ:
            return models.eotf_ST2084(signal)
        return models.eotf_BT2100_HLG(signal, L_W=PEAK)

    def _tonemap(self, linear: np.ndarray) -> np.ndarray:
        height, width = linear.shape[:2]
        if self._graph is None or self._size != (width, height):
            self._graph = av.filter.Graph()
            source = self._graph.add_buffer(width=width, height=height, format="gbrpf32le", time_base=Fraction(1, 1))
            curve = self._graph.add("tonemap", f"tonemap=mobius:desat=0:peak={PEAK / REFERENCE_WHITE}")
            source.link_to(curve)
            curve.link_to(self._graph.add("buffersink"))
            self._graph.configure()
            self._size = (width, height)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(linear, dtype=np.float32), format="gbrpf32le")
        frame.pts = self._count
        self._count += 1
        self._graph.push(frame)
        return self._graph.pull().to_ndarray()

    def __call__(self, frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
        """`frame` at `width`×`height` as BT.709 SDR RGB uint8 (H, W, 3)."""
        signal = frame.to_ndarray(format="gbrpf32le", width=width, height=height, interpolation="BICUBIC")
        light = self._light(np.clip(signal, 0, 1)) @ self._to_709.T
        mapped = self._tonemap(np.clip(light, 0, None) / REFERENCE_WHITE)
        sdr = self._colour.models.eotf_inverse_BT1886(np.clip(mapped, 0, 1))
        return np.round(sdr * 255).astype(np.uint8)
