"""Decoding a video container (a file or a stream on standard input) with PyAV."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from fractions import Fraction
from itertools import chain
from typing import Any

import av
import numpy as np

from vlrt.errors import VlrtError
from vlrt.io.av_errors import reason
from vlrt.io.hdr import ToneMapper

# Probe only what the stream headers say, so a live producer is not waited on; the first
# decoded frame gives the size anyway. (analyzeduration 0 would mean "the default".)
STREAM_PROBE_OPTIONS = {"probesize": "32", "analyzeduration": "1", "fpsprobesize": "0"}
log = logging.getLogger(__name__)
# Short names users type, mapped to FFmpeg's demuxer names.
FORMAT_ALIASES = {"y4m": "yuv4mpegpipe", "mkv": "matroska", "ts": "mpegts"}


def open_video(
    file: Any, label: str, *, format: str | None = None, streaming: bool = False
) -> av.container.InputContainer:
    """Open `file` (a path or a readable object) for decoding, or say in one line why not."""
    demuxer = FORMAT_ALIASES.get(format, format) if format else None
    if demuxer and demuxer not in av.formats_available:
        raise VlrtError(
            f"unknown input format '{format}' for {label}: use nut, matroska, mpegts, mp4, y4m or rawvideo"
        )
    try:
        container = av.open(file, "r", format=demuxer, options=STREAM_PROBE_OPTIONS if streaming else {})
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VlrtError(
            f"{label} cannot be read as a video ({reason(exc)}): check that the file is complete and plays"
        ) from exc
    if not container.streams.video:
        container.close()
        raise VlrtError(f"{label} has no video stream: give a video file, a folder of frames or one image")
    if not streaming:
        # Frame threads decode faster but hold frames back; only a file can afford that.
        container.streams.video[0].thread_type = "AUTO"
    return container


def video_fps(stream: av.video.stream.VideoStream) -> Fraction | None:
    """The stream's frame rate: the measured average, else what the codec or header declares."""
    for rate in (stream.average_rate, stream.codec_context.framerate, stream.guessed_rate):
        if rate:
            return Fraction(rate)
    return None


def estimate_frame_count(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> int | None:
    """Frames in the stream per its header (exact for most files), else duration times rate."""
    if stream.frames:
        return int(stream.frames)
    fps = video_fps(stream)
    if stream.duration and stream.time_base and fps:
        return round(stream.duration * stream.time_base * fps)
    if container.duration and fps:
        return round(container.duration / av.time_base * fps)
    return None


def warn_if_truncated(label: str, announced: int | None, decoded: int, fps: Fraction | None) -> None:
    """Warn when a container's header announced more frames than the stream held (a file cut short
    by an interrupted download or recording). Half a second of slack (at least 3 frames) absorbs a
    sound track that outlasts the pictures. MPEG-TS announces no length, so a cut one looks complete."""
    if not announced or not fps:
        return
    missing = announced - decoded
    if missing >= max(3, round(fps / 2)):
        log.warning(
            f"warning: {label} announced {announced} frames ({float(announced / fps):.2f} s) but only {decoded} could be "
            f"decoded ({float(decoded / fps):.2f} s): it looks truncated; the {decoded} frames are rendered"
        )


def _has_alpha(frame: av.VideoFrame) -> bool:
    return any(component.is_alpha for component in frame.format.components)


def sample_aspect_ratio(stream: av.video.stream.VideoStream) -> Fraction:
    """The width of a stored pixel over its height as displayed (1 for square pixels)."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return Fraction(sar) if sar else Fraction(1)


def display_size(width: int, height: int, sar: Fraction) -> tuple[int, int]:
    """The square-pixel size that shows a `width`×`height` picture of pixel aspect `sar` as players
    do: the stretched side grows, so no stored pixel is lost."""
    if sar > 1:
        return round(width * sar), height
    if sar < 1:
        return width, round(height / sar)
    return width, height


def to_arrays(
    frame: av.VideoFrame, sar: Fraction = Fraction(1), tone_map: ToneMapper | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB uint8 (and alpha when the stream has it), in square pixels at the display aspect
    (anamorphic video, `sar` ≠ 1, is scaled by FFmpeg's swscale), turned upright per the display
    matrix; HDR frames go through `tone_map` to BT.709 SDR (`vlrt.io.hdr`)."""
    width, height = display_size(frame.width, frame.height, sar)
    if tone_map is not None:
        rgb, alpha = tone_map(frame, width, height), None
    elif _has_alpha(frame):
        rgba = frame.to_ndarray(format="rgba", width=width, height=height, interpolation="BICUBIC")
        rgb, alpha = rgba[..., :3], rgba[..., 3]
    else:
        rgb, alpha = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC"), None
    turns = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns, as players apply
    if turns:
        rgb = np.rot90(rgb, turns)
        alpha = None if alpha is None else np.rot90(alpha, turns)
    return np.ascontiguousarray(rgb), None if alpha is None else np.ascontiguousarray(alpha)


def deinterlaced(frames: Iterator[av.VideoFrame], label: str) -> Iterator[av.VideoFrame]:
    """`frames` deinterlaced by FFmpeg's bwdif when the first one is interlaced (saying so once):
    one frame per frame, each field's missing lines interpolated with its neighbours' motion, so
    moving edges do not comb. Frames flagged progressive pass unchanged; a progressive stream
    does not enter the filter at all."""
    try:
        first = next(frames, None)
        if first is None or not first.interlaced_frame:
            yield from () if first is None else chain([first], frames)
            return
        log.info(f"{label} is interlaced: deinterlacing it with FFmpeg's bwdif (--deinterlace off keeps its fields)")
        graph = av.filter.Graph()
        source = graph.add_buffer(width=first.width, height=first.height, format=first.format, time_base=first.time_base)
        bwdif = graph.add("bwdif", "mode=send_frame:parity=auto:deint=interlaced")
        source.link_to(bwdif)
        bwdif.link_to(graph.add("buffersink"))
        graph.configure()
        for frame in chain([first], frames, [None]):
            graph.push(frame)
            while True:
                try:
                    yield graph.pull()
                except (av.error.BlockingIOError, av.error.EOFError):
                    break
    finally:
        frames.close()


def decoded_frames(
    container: av.container.InputContainer, label: str, streaming: bool = False, announced: int | None = None
) -> Iterator[av.VideoFrame]:
    """Every frame of the first video stream in order; the container is closed at the end.

    When decoding reaches the end well short of the `announced` frame count (see
    `warn_if_truncated`), a warning says so with the numbers; the frames decoded are kept.
    A decoding error becomes a one-line `VlrtError` saying how far decoding got. A plain mp4/mov
    on a pipe (`streaming`) fails at its first frame: its index (moov) follows the pictures, so
    FFmpeg reads past them to find it and cannot go back; that is no corruption, and the message
    says how to feed such a file.
    """
    decoded = 0
    try:
        for frame in container.decode(container.streams.video[0]):
            yield frame
            decoded += 1
        warn_if_truncated(label, announced, decoded, video_fps(container.streams.video[0]))
    except av.error.FFmpegError as exc:
        if streaming and not decoded and container.format.name.startswith("mov"):
            raise VlrtError(
                f"{label} is a plain mp4/mov, whose index comes after the pictures, so it cannot stream: give "
                "its path as INPUT or redirect it with '< file.mp4' (both can seek), or make it with "
                "'-movflags +faststart', or pipe it as '-f nut'"
            ) from exc
        where = f"after frame {decoded}" if decoded else "at its first frame"
        raise VlrtError(f"{label} is corrupt {where} ({reason(exc)}): re-encode or repair the video") from exc
    finally:
        container.close()
