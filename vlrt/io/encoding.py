"""Choosing muxer, codec, pixel format and codec options for a video output.

Defaults, and why:

- Files (.mp4/.m4v/.mov/.mkv): H.264 (libx264), yuv420p, CRF `crf` (17 by default), tagged
  BT.709: plays in every browser, phone and editor. .webm: VP9 yuv420p at CRF `crf` (VP9's
  scale is not x264's; 17 is very high quality there too).
- `lossless=True` gives pictures that decode back bit-exactly to the RGB that was written
  (measured with PyAV's own decoder): libx264rgb qp 0 in .mp4/.mov (decodes as gbrp), FFV1
  bgr0 in .mkv (FFmpeg's archival codec, much wider support in .mkv than H.264 RGB), VP9
  lossless gbrp in .webm. yuv420p can never be exact: it halves the chroma resolution.
- Pipes are lossless by default, because another program re-encodes what vlrt writes:
  nut carries raw rgb24, matroska FFV1 bgr0, mpegts libx264rgb qp 0 with zero-latency
  tuning (mpegts can carry neither raw video nor FFV1). y4m can only hold YUV, so it gets
  raw yuv444p: no chroma loss, but RGB→YUV rounding leaves errors of a level or two.
- Alpha survives only where the result is lossless and the codec stores it (FFV1 bgra,
  raw rgba, VP9 gbrap); other video outputs drop it. PNG-folder outputs always keep it.
- `codec` overrides the choice; its pixel format is then the first the encoder supports
  from the lossless or lossy preference list below.
- 4:2:0 needs even sizes: an odd-sized frame is padded by repeating its last row/column
  (`video_out.pad_to_even`), so the video is one pixel larger and no rendered pixel is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av

from vlrt.errors import VlrtError

FILE_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}
PIPE_MUXERS = {
    "nut": "nut", "matroska": "matroska", "mkv": "matroska", "mpegts": "mpegts", "ts": "mpegts",
    "y4m": "yuv4mpegpipe", "yuv4mpegpipe": "yuv4mpegpipe",
}
_LOSSY_CODEC = {"webm": "libvpx-vp9"}  # else libx264
_LOSSLESS_CODEC = {"mp4": "libx264rgb", "mov": "libx264rgb", "matroska": "ffv1", "webm": "libvpx-vp9"}
_PIPE_CODEC = {"nut": "rawvideo", "matroska": "ffv1", "mpegts": "libx264rgb", "yuv4mpegpipe": "rawvideo"}
_FIXED_PIX_FMT = {"yuv4mpegpipe": "yuv444p"}  # y4m has no RGB

_LOSSLESS_RGB = ("rgb24", "bgr0", "bgr24", "gbrp")
_LOSSLESS_RGBA = ("rgba", "bgra", "gbrap")
_LOSSY = ("yuv420p",)

_CRF_CODECS = {"libx264", "libx264rgb", "libx265", "libvpx-vp9", "libsvtav1"}
_LOSSLESS_OPTIONS = {
    "libx264": {"qp": "0"},
    "libx264rgb": {"qp": "0"},
    "libx265": {"x265-params": "lossless=1"},
    "libvpx-vp9": {"lossless": "1"},
}
_ALWAYS_LOSSLESS = {"ffv1", "rawvideo", "png", "utvideo", "huffyuv", "ffvhuff", "qtrle", "magicyuv"}
_X264 = {"libx264", "libx264rgb"}
_FLOAT_CRF = {"libx264", "libx264rgb", "libx265"}


@dataclass(frozen=True)
class Encoding:
    """How one video output is encoded."""

    muxer: str
    codec: str
    pix_fmt: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def keeps_alpha(self) -> bool:
        return any(c.is_alpha for c in av.VideoFormat(self.pix_fmt).components)

    @property
    def yuv(self) -> bool:
        return self.pix_fmt.startswith(("yuv", "nv"))

    @property
    def needs_even_size(self) -> bool:
        """True when chroma is subsampled, so width and height must be even."""
        pixels = av.VideoFormat(self.pix_fmt)
        return pixels.chroma_width(2) < 2 or pixels.chroma_height(2) < 2


def file_muxer(path: Path) -> str:
    """The muxer for an output file, chosen by its extension."""
    muxer = FILE_MUXERS.get(path.suffix.lower())
    if muxer is None:
        raise VlrtError(
            f"cannot tell the video format of output '{path}' from its extension: "
            "use .mp4, .mov, .mkv or .webm, or a folder path ending in / for PNG frames"
        )
    return muxer


def pipe_muxer(output_format: str | None) -> str:
    """The muxer for standard output (nut by default); "rawvideo" is handled without one."""
    muxer = PIPE_MUXERS.get(output_format or "nut")
    if muxer is None:
        raise VlrtError(
            f"unknown output format '{output_format}' for standard output: "
            "use nut, matroska, mpegts, y4m or rawvideo"
        )
    return muxer


def check_codec(codec: str) -> None:
    """Fail early, before any frame is rendered, on an encoder this FFmpeg build lacks."""
    try:
        is_video = av.Codec(codec, "w").type == "video"
    except (ValueError, av.error.FFmpegError):
        is_video = False
    if not is_video:
        raise VlrtError(
            f"video encoder '{codec}' is not available: use libx264, libx265, libvpx-vp9, libsvtav1, ffv1 "
            "or leave the codec out"
        )


def _pick_pix_fmt(codec: str, wanted: tuple[str, ...], fallback: tuple[str, ...]) -> str:
    formats = av.Codec(codec, "w").video_formats
    supported = None if formats is None else [f.name for f in formats]
    for name in (*wanted, *fallback):
        if supported is None or name in supported:
            return name
    return supported[0]


def choose_encoding(
    muxer: str, *, pipe: bool, codec: str | None, lossless: bool, crf: float, alpha: bool
) -> Encoding:
    """The encoding for `muxer`; `alpha` says whether the frames carry transparency."""
    if codec is None:
        if pipe:
            codec, lossless = _PIPE_CODEC[muxer], True
        elif lossless:
            codec = _LOSSLESS_CODEC[muxer]
        else:
            codec = _LOSSY_CODEC.get(muxer, "libx264")
    check_codec(codec)
    if lossless and codec not in _LOSSLESS_OPTIONS and codec not in _ALWAYS_LOSSLESS:
        raise VlrtError(
            f"video encoder '{codec}' has no lossless mode: drop the lossless option "
            "or use ffv1, libx264rgb or libvpx-vp9"
        )
    if muxer in _FIXED_PIX_FMT:
        pix_fmt = _FIXED_PIX_FMT[muxer]
    elif lossless:
        pix_fmt = _pick_pix_fmt(codec, _LOSSLESS_RGBA if alpha else (), (*_LOSSLESS_RGB, "yuv444p"))
    else:
        pix_fmt = _pick_pix_fmt(codec, (), _LOSSY)
    options: dict[str, str] = {}
    if lossless:
        options.update(_LOSSLESS_OPTIONS.get(codec, {}))
    elif codec in _CRF_CODECS:
        options["crf"] = f"{crf:g}" if codec in _FLOAT_CRF else str(round(crf))
        if codec == "libvpx-vp9":
            options.update({"b": "0", "row-mt": "1"})  # constant quality, not a bitrate target
    if pipe and codec in _X264:
        options["tune"] = "zerolatency"  # no lookahead: each frame leaves as soon as it is encoded
    return Encoding(muxer, codec, pix_fmt, options)
