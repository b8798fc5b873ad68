"""Encoding frames into one video container (a file or a pipe) with PyAV."""

from __future__ import annotations

from contextlib import suppress
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import av
import numpy as np

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.io.audio import Soundtracks, carry_audio
from vlrt.io.av_errors import reason
from vlrt.io.encoding import Encoding, choose_encoding

# AVCOL_* codes for BT.709 primaries / transfer / matrix and limited ("tv") range.
_BT709, _TV_RANGE = 1, 1


def pad_to_even(pixels: np.ndarray) -> np.ndarray:
    """Repeat the last row and/or column so both sides are even (4:2:0 chroma needs it).

    Padding keeps every rendered pixel; the added edge line is a copy of its neighbour, so
    it is invisible, and the video is at most one pixel wider or taller than the frames.
    """
    height, width = pixels.shape[:2]
    if not (height % 2 or width % 2):
        return pixels
    spec = ((0, height % 2), (0, width % 2)) + ((0, 0),) * (pixels.ndim - 2)
    return np.pad(pixels, spec, mode="edge")


class VideoEncoder:
    """Frames in, one muxed video out; the stream is set up from the first frame.

    `target` is a path or a writable file object. With `pipe` the muxer flushes after every
    packet and `target.flush()` runs after every frame, so a reader downstream sees each
    frame as soon as it is encoded. The codec is chosen for `muxer`; `container` (default:
    `muxer`) is the format actually written, so a part of a file output (`vlrt.io.parts`)
    is encoded exactly as the final file will hold it.
    """

    def __init__(
        self,
        target: Any,
        label: str,
        *,
        muxer: str,
        fps: Fraction,
        codec: str | None,
        lossless: bool,
        crf: float,
        pipe: bool,
        audio_from: Path | None = None,
        container_options: dict[str, str] | None = None,
        buffer_size: int = 32768,
        container: str | None = None,
    ) -> None:
        self._target, self._label, self._fps, self._pipe = target, label, Fraction(fps), pipe
        self._choose = partial(choose_encoding, muxer, pipe=pipe, codec=codec, lossless=lossless, crf=crf)
        self._choose(alpha=False)  # a bad codec choice fails now, not after the first frame
        self._audio_from = audio_from
        self._options = {**(container_options or {}), **({"flush_packets": "1"} if pipe else {})}
        self._buffer_size = buffer_size
        self._format = container
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._encoding: Encoding | None = None
        self._audio: Soundtracks | None = None
        self._size: tuple[int, int] | None = None
        self.frames_written = 0

    def _start(self, frame: Frame) -> None:
        self._encoding = enc = self._choose(alpha=frame.alpha is not None)
        self._size = (frame.width, frame.height)
        try:
            self._container = av.open(
                self._target, "w", format=self._format or enc.muxer,
                container_options=self._options, buffer_size=self._buffer_size,
            )
        except (av.error.FFmpegError, OSError) as exc:
            raise VlrtError(
                f"cannot write output {self._label} ({reason(exc)}): check the folder exists and is writable"
            ) from exc
        width, height = frame.width, frame.height
        if enc.needs_even_size:
            width, height = width + width % 2, height + height % 2
        stream = self._container.add_stream(enc.codec, rate=self._fps, options=enc.options)
        stream.width, stream.height, stream.pix_fmt = width, height, enc.pix_fmt
        if enc.yuv and enc.muxer != "yuv4mpegpipe":  # y4m cannot carry the tags; readers assume BT.601
            context = stream.codec_context
            context.colorspace = context.color_primaries = context.color_trc = _BT709
            context.color_range = _TV_RANGE
        self._stream = stream
        if self._audio_from is not None:
            self._audio = carry_audio(self._audio_from, self._container)

    def _picture(self, frame: Frame) -> av.VideoFrame:
        enc = self._encoding
        if (frame.width, frame.height) != self._size:
            width, height = self._size
            raise ValueError(f"frame {frame.index} is {frame.width}x{frame.height}, the video is {width}x{height}")
        with_alpha = enc.keeps_alpha and frame.alpha is not None
        pixels = np.dstack([frame.image, frame.alpha]) if with_alpha else frame.image
        if enc.needs_even_size:
            pixels = pad_to_even(pixels)
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgba" if with_alpha else "rgb24")
        if enc.yuv:
            matrix = "ITU601" if enc.muxer == "yuv4mpegpipe" else "ITU709"
            picture = picture.reformat(format=enc.pix_fmt, dst_colorspace=matrix, dst_color_range="MPEG")
        picture.pts, picture.time_base = self.frames_written, 1 / self._fps
        return picture

    def write(self, frame: Frame) -> None:
        """Encode and mux one frame (and the sound up to its end)."""
        if self._container is None:
            self._start(frame)
        picture = self._picture(frame)
        try:
            packets = self._stream.encode(picture)
        except (av.error.FFmpegError, ValueError) as exc:
            raise VlrtError(
                f"cannot encode {self._encoding.codec} ({self._encoding.pix_fmt}) for output {self._label} "
                f"({reason(exc)}): choose another codec or output extension"
            ) from exc
        self._container.mux(packets)
        self.frames_written += 1
        if self._audio is not None:
            self._audio.feed_until(self.frames_written / self._fps)
        if self._pipe:
            self._target.flush()

    def finish(self) -> None:
        """Flush the encoder, finish the sound at the video's end, and close the container."""
        if self._container is None:
            return
        self._container.mux(self._stream.encode(None))
        if self._audio is not None:
            self._audio.finish(self.frames_written / self._fps)
        self._container.close()
        if self._pipe:
            self._target.flush()

    def discard(self) -> None:
        """Release everything after a failure; errors now would hide the first one."""
        for resource in (self._audio, self._container):
            if resource is not None:
                with suppress(Exception):
                    resource.close()
