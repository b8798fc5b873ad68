"""Where frames come from: a video file, a folder of images, one image, or standard input.

`open_source` checks the input and decodes its first frame before returning, so a missing,
empty, corrupt or wrongly described input fails with one line before any output exists. The
rest is decoded lazily on a background thread, a few frames ahead of the consumer: memory
does not grow with the video's length and decoding overlaps inference.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import av

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.io import rawvideo
from vlrt.io.hdr import NAMES, PEAK, REFERENCE_WHITE, ToneMapper, hdr_transfer
from vlrt.io.images import animation_durations, animation_frames, is_image_file, list_images, read_image
from vlrt.io.pipes import PipeReader
from vlrt.io.seek import count_video_frames, frames_from, variable_frame_times
from vlrt.io.threads import Prefetched, prefetch
from vlrt.io.video_in import (
    decoded_frames,
    deinterlaced,
    estimate_frame_count,
    open_video,
    sample_aspect_ratio,
    to_arrays,
    video_fps,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
PREFETCH_FRAMES = 8
STDIN_LABEL = "standard input"


@dataclass(frozen=True)
class SourceInfo:
    """What is known about an input before its frames are read."""

    width: int  # of the frames as decoded (the first frame's, for image folders)
    height: int
    fps: Fraction | None  # before subsampling; None for images unless input_fps says
    frame_count: int | None  # frames from the first (after subsampling and max_frames); estimate for video
    path: Path | None  # the input file, for audio passthrough; None for folders and stdin
    has_audio: bool
    kind: str  # "video" | "folder" | "image" | "stdin"
    # Each kept frame's time in seconds when the source's frame rate varies (a video file, an
    # animation of unequal durations); None at a constant rate. A video output keeps these times.
    frame_times: list[Fraction] | None = None


class Source:
    """The frames of one input, in order, each once; iterate it a single time.

    Frame.meta holds "path" (the file) for image-folder frames and "time" (seconds in the
    source) for video frames. Use it as a context manager, or call `close()`, to stop the
    decoder early and release the file.
    """

    def __init__(self, info: SourceInfo, frames: Iterator[Frame]) -> None:
        self.info = info
        self._frames: Iterator[Frame] | None = frames
        self._live: Prefetched[Frame] | None = None

    def __iter__(self) -> Iterator[Frame]:
        if self._frames is None:
            raise RuntimeError("a Source is read once: open the input again to re-read it")
        self._live = prefetch(self._frames, PREFETCH_FRAMES, name="vlrt-decode")
        self._frames = None
        return self._live

    def close(self) -> None:
        if self._live is not None:
            self._live.close()  # its worker closes the decoder
        elif self._frames is not None:
            self._frames.close()
            self._frames = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _pick(items: Iterable[T], nth: int, limit: int | None, start: int = 0) -> Iterator[tuple[int, T]]:
    """Every `nth` item from the first, numbered from `start`, up to number `limit`; `items` begins
    at item `start × nth` (the caller has skipped or seeked to it)."""
    return enumerate(islice(islice(items, 0, None, nth), None if limit is None else max(0, limit - start)), start)


def _count(total: int | None, nth: int, limit: int | None) -> int | None:
    if total is None:
        return None
    kept = math.ceil(total / nth)
    return kept if limit is None else min(kept, limit)


def _animation_source(
    path: Path, durations: list[float], nth: int, limit: int | None, fps: Fraction | None, start: int
) -> Source:
    """An animated GIF, APNG or WebP as a video: each frame carries its start time. Equal durations
    give the rate exactly; unequal ones the average rate (`input_fps` overrides both), and their
    times go to `SourceInfo.frame_times`."""
    starts = [sum(durations[:number]) for number in range(len(durations))]
    varies = fps is None and len(set(durations)) > 1
    if fps is None:
        fps = (Fraction(1) / Fraction(durations[0]).limit_denominator(1000) if len(set(durations)) == 1
               else Fraction(len(durations)) / Fraction(sum(durations)).limit_denominator(1000))

    def frames() -> Iterator[Frame]:
        pictures = animation_frames(path, start * nth)
        for index, (image, alpha) in _pick(pictures, nth, limit, start):
            yield Frame(index, image, alpha, _default_name(index), {"time": starts[index * nth]})

    times = [Fraction(t).limit_denominator(1000) for t in starts[::nth][:limit]] if varies else None

    def info(first: Frame) -> SourceInfo:
        return SourceInfo(first.width, first.height, fps, _count(len(durations), nth, limit), None, False, "video", times)

    return _start(info, frames(), start=start)


def _default_name(index: int) -> str:
    return f"{index:06d}.png"


def _start(
    make_info: Callable[[Frame], SourceInfo], frames: Iterator[Frame], empty_message: str = "the input gave no frames",
    start: int = 0,
) -> Source:
    """Decode the first frame now (it gives the size and proves the input is readable)."""
    try:
        first = next(frames)
    except StopIteration:
        if start:
            raise VlrtError(f"the input has fewer than {start + 1} frames: choose frames within it") from None
        raise VlrtError(empty_message) from None
    return Source(make_info(first), _chained(first, frames))


def _chained(first: Frame, rest: Iterator[Frame]) -> Iterator[Frame]:
    """`first` then `rest`, closing `rest` when this generator is closed early."""
    try:
        yield first
        yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()


def _folder_files(folder: Path, nth: int, limit: int | None) -> list[Path]:
    """The image files a folder input yields, in order."""
    files = list_images(folder)
    if not files:
        raise VlrtError(
            f"input folder '{folder}' holds no images (.png, .jpg, ...): "
            "point INPUT at a folder of frames, a video file or one image"
        )
    return [path for _, path in _pick(files, nth, limit)]


def _folder_source(folder: Path, nth: int, limit: int | None, fps: Fraction | None, start: int) -> Source:
    chosen = _folder_files(folder, nth, limit)

    def frames() -> Iterator[Frame]:
        for index in range(start, len(chosen)):
            image, alpha = read_image(chosen[index])
            yield Frame(index, image, alpha, chosen[index].name, {"path": chosen[index]})

    def info(first: Frame) -> SourceInfo:
        return SourceInfo(first.width, first.height, fps, len(chosen), None, False, "folder")

    return _start(info, frames(), start=start)


def _image_source(path: Path, max_frames: int | None, fps: Fraction | None, start: int) -> Source:
    if max_frames is None:
        raise VlrtError(
            f"input '{path}' is a single image: give max_frames (--max-frames N) to say how many frames to make of it"
        )
    image, alpha = read_image(path)

    def frames() -> Iterator[Frame]:
        for index in range(start, max_frames):  # copies: stages may change a frame in place
            yield Frame(index, image.copy(), None if alpha is None else alpha.copy(), _default_name(index), {})

    def info(first: Frame) -> SourceInfo:
        return SourceInfo(first.width, first.height, fps, max_frames, path, False, "image")

    return _start(info, frames(), start=start)


def _video_frames(
    decoded: Iterator[av.VideoFrame], nth: int, limit: int | None, start: int, sar: Fraction, tone_map: ToneMapper | None
) -> Iterator[Frame]:
    """Frames `start`, … from `decoded`, which begins at decoded frame `start × nth`, in square pixels (and SDR)."""
    try:
        for index, frame in _pick(decoded, nth, limit, start):
            image, alpha = to_arrays(frame, sar, tone_map)
            yield Frame(index, image, alpha, _default_name(index), {"time": frame.time})
    finally:
        decoded.close()


def _skipped(items: Iterator[T], count: int) -> Iterator[T]:
    """`items` after the first `count`, closing `items` when closed early."""
    try:
        yield from islice(items, count, None)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _video_source(
    file: Any, label: str, *, path: Path | None, kind: str, streaming: bool, nth: int, limit: int | None,
    input_format: str | None, fps: Fraction | None, start: int, exact_count: bool, deinterlace: bool,
) -> Source:
    container = open_video(file, label, format=input_format, streaming=streaming)
    stream = container.streams.video[0]
    has_audio = bool(container.streams.audio)
    rate = fps or video_fps(stream)
    sar = sample_aspect_ratio(stream)
    transfer = hdr_transfer(stream)
    if transfer is not None:
        log.info(f"{label} is HDR ({NAMES[transfer]}, BT.2020): tone-mapped to BT.709 SDR (reference white "
                 f"{REFERENCE_WHITE:g} cd/m² to SDR white, highlights rolled off up to {PEAK:g} cd/m²)")
    announced = estimate_frame_count(container, stream)
    times = None
    if fps is None and path is not None and stream.average_rate != stream.base_rate:  # the rate may vary: check the packets
        times = variable_frame_times(str(path), label, input_format, stream.time_base, stream.start_time)
        if times is not None:
            times = list(islice(times[::nth], limit))
            log.info(f"{label} has a variable frame rate: the output keeps each frame's time "
                     "(--output-frame-rate gives a constant rate instead)")
    if streaming:
        total = None
    elif exact_count and path is not None:
        total = _count(count_video_frames(str(path), label, input_format), nth, limit)
    else:
        total = _count(announced, nth, limit)
    if start and path is not None:
        container.close()  # a file seeks, in containers of its own
        # The deinterlacer looks one frame back: it starts a frame early, whose output is dropped.
        lead = 1 if deinterlace else 0
        decoded = frames_from(str(path), label, start * nth - lead, input_format)
        if deinterlace:
            decoded = _skipped(deinterlaced(decoded, label), lead)
    else:
        decoded = decoded_frames(container, label, streaming, announced)
        if deinterlace:
            decoded = deinterlaced(decoded, label)
        decoded = _skipped(decoded, start * nth)

    def info(first: Frame) -> SourceInfo:
        return SourceInfo(first.width, first.height, rate, total, path, has_audio, kind, times)

    return _start(
        info,
        _video_frames(decoded, nth, limit, start, sar, None if transfer is None else ToneMapper(transfer)),
        f"{label} decoded to zero frames: check that the video is complete and plays",
        start,
    )


def _raw_source(
    raw: BinaryIO | Path, label: str, *, kind: str, size: tuple[int, int] | None,
    nth: int, limit: int | None, fps: Fraction | None, start: int,
) -> Source:
    """Raw rgb24 frames from a stream, or from a file whose length must be whole frames."""
    per_frame = rawvideo.frame_bytes(size, label)
    path = raw if isinstance(raw, Path) else None
    total = None
    if path is not None:
        file_size = path.stat().st_size
        if file_size % per_frame:
            raise VlrtError(
                f"raw video {label} is {file_size} bytes, not a whole number of "
                f"{size[0]}x{size[1]} rgb24 frames: {rawvideo.SIZE_HINT}"
            )
        total = _count(file_size // per_frame, nth, limit)

    def frames() -> Iterator[Frame]:
        stream = raw if path is None else path.open("rb")
        try:
            if path is not None:
                stream.seek(start * nth * per_frame)
            images = rawvideo.raw_frames(stream, size, label)
            if path is None:
                images = _skipped(images, start * nth)
            for index, image in _pick(images, nth, limit, start):
                yield Frame(index, image, None, _default_name(index), {})
        finally:
            if path is not None:
                stream.close()

    def info(first: Frame) -> SourceInfo:
        return SourceInfo(first.width, first.height, fps, total, path, False, kind)

    return _start(info, frames(), f"raw video on {label} ended before its first frame: check the producer", start)


def _stdin_source(
    stdin: BinaryIO | None, *, nth: int, limit: int | None, input_format: str | None,
    input_size: tuple[int, int] | None, fps: Fraction | None, start: int, deinterlace: bool,
) -> Source:
    stream = stdin if stdin is not None else sys.stdin.buffer
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        raise VlrtError(
            "standard input is a terminal: pipe a video into vlrt (... | vlrt render - ...) or give an INPUT path"
        )
    if input_format == "rawvideo":
        return _raw_source(
            stream, STDIN_LABEL, kind="stdin", size=input_size, nth=nth, limit=limit, fps=fps, start=start
        )
    seekable = getattr(stream, "seekable", None)
    # A redirected file can seek (so even a plain mp4 works); a pipe must be read as it comes.
    streaming = not (seekable is not None and seekable())
    return _video_source(
        PipeReader(stream) if streaming else stream, STDIN_LABEL, path=None, kind="stdin", streaming=streaming,
        nth=nth, limit=limit, input_format=input_format, fps=fps, start=start, exact_count=False, deinterlace=deinterlace,
    )


def open_source(
    spec: str,
    *,
    extract_nth_frame: int = 1,
    max_frames: int | None = None,
    is_continue: bool = False,
    input_format: str | None = None,
    input_size: tuple[int, int] | None = None,
    input_fps: Fraction | None = None,
    stdin: BinaryIO | None = None,
    start: int = 0,
    exact_count: bool = False,
    deinterlace: bool = True,
) -> Source:
    """Open INPUT: a video file, a folder of images, one image, or "-" for standard input.

    Keeps every `extract_nth_frame`-th frame from the first, then at most `max_frames`
    (`is_continue` skips the subsampling, as in the original extension). `input_fps`
    overrides the rate a video declares and gives one to image inputs. `input_format`
    forces a demuxer; "rawvideo" reads bare rgb24 frames of `input_size` (W, H).
    `start` > 0 yields frames from number `start` on (numbered as from the first): a video
    file seeks to it frame-accurately (`vlrt.io.seek`), a folder or raw file goes straight to
    it, standard input reads and drops the frames before it. `info` still describes the whole input;
    its `frame_count` is exact except for a video file's, an estimate from the header unless
    `exact_count` has the packets counted (a pass over the file without decoding). Interlaced
    video is deinterlaced unless `deinterlace` is False (`video_in.deinterlaced`).
    """
    nth = 1 if is_continue else extract_nth_frame
    if nth < 1:
        raise VlrtError(f"extract_nth_frame must be 1 or more, got {extract_nth_frame}: 1 keeps every frame")
    if max_frames is not None and max_frames < 1:
        raise VlrtError(f"max_frames must be 1 or more, got {max_frames}: leave it out to read every frame")
    fps = Fraction(input_fps) if input_fps else None
    if input_size is not None and input_format != "rawvideo":
        raise VlrtError("--input-size only applies to raw frames: add --input-format rawvideo or drop --input-size")
    if spec == "-":
        return _stdin_source(
            stdin, nth=nth, limit=max_frames, input_format=input_format, input_size=input_size, fps=fps, start=start,
            deinterlace=deinterlace,
        )
    path = Path(spec)
    if not path.exists():
        raise VlrtError(f"input '{spec}' does not exist: check the path, or use '-' to read standard input")
    if path.is_dir():
        return _folder_source(path, nth, max_frames, fps, start)
    if input_format == "rawvideo":
        return _raw_source(
            path, f"'{path}'", kind="video", size=input_size, nth=nth, limit=max_frames, fps=fps, start=start
        )
    if is_image_file(path):
        durations = animation_durations(path)
        if durations is not None:
            return _animation_source(path, durations, nth, max_frames, fps, start)
        return _image_source(path, max_frames, fps, start)
    return _video_source(
        str(path), f"video '{path}'", path=path, kind="video", streaming=False, nth=nth, limit=max_frames,
        input_format=input_format, fps=fps, start=start, exact_count=exact_count, deinterlace=deinterlace,
    )
