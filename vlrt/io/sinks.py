"""Where frames go: a video file, a folder of PNGs, or standard output.

Every sink encodes on a background thread behind a bounded queue: `write()` only queues the
frame, so encoding overlaps inference, and an encoder error comes back from the next
`write()` or from `close()`. Nothing that looks finished is left by a failed run: a video
file is encoded in whole parts in a hidden folder beside the target (`vlrt.io.parts`),
joined by `close()` under a temporary name and renamed onto the target; a kill or `abort()`
leaves the whole parts, so `--resume` continues after them. PNG frames are each written to a
temporary name and renamed, so a folder only ever holds whole frames. In a segment-parallel
render each task writes its segment's share of a video file with `SegmentSink` (whole parts,
sealed once complete: `vlrt.io.segment_parts`) and the driver joins them with `join_video`.
Codec choices are in `vlrt.io.encoding`.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.io.encoding import choose_encoding, file_muxer, pipe_muxer
from vlrt.io.images import write_png
from vlrt.io.join import join_parts
from vlrt.io.parts import Part, PartWriter, commit, part_encoders, parts_folder, tidy_parts
from vlrt.io.pipes import PipeWriter
from vlrt.io.segment_parts import attempt_folder, seal, segment_folder
from vlrt.io.threads import BackgroundWorker
from vlrt.io.video_out import VideoEncoder

QUEUED_FRAMES = 8
# PyAV's I/O buffer on pipes. flush_packets already passes on every packet at once; a small
# buffer also keeps a stalled reader from holding back more than a few KiB of a frame.
PIPE_BUFFER_BYTES = 8192


class Sink:
    """Takes frames in index order; `close()` completes the output, `abort()` withdraws it.

    As a context manager it closes on success and aborts when the block raised.
    """

    def __init__(self) -> None:
        self._worker: BackgroundWorker[Frame] = BackgroundWorker(self._write_named, QUEUED_FRAMES, name="vlrt-encode")
        self._done = False

    def write(self, frame: Frame) -> None:
        """Queue `frame`; raises the error of an earlier frame that failed to encode."""
        if self._done:
            raise RuntimeError("write() after close() or abort()")
        self._worker.submit(frame)

    def close(self) -> None:
        """Encode what is queued and finish the output; on failure nothing is left behind."""
        if self._done:
            return
        self._done = True
        try:
            self._worker.finish()
            self._finish()
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        """Stop and remove what is incomplete (finished PNG frames stay: each is whole)."""
        if self._done:
            return
        self._done = True
        self._worker.cancel()
        self._discard()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _write_named(self, frame: Frame) -> None:
        """A full disk or a dead device, named with the frame that failed (frames are queued, so the
        producer learns of it a few frames later)."""
        try:
            self._write_now(frame)
        except OSError as exc:
            raise VlrtError(
                f"writing frame {frame.index} to the output failed: {exc.strerror or exc}; finished frames are kept: "
                "free space or fix the output, then run the same command with --resume"
            ) from exc

    # Hooks, run on the worker thread (`_write_now`) or after it has stopped (the others).
    def _write_now(self, frame: Frame) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Complete the output once every frame is written."""

    def _discard(self) -> None:
        """Remove what must not look finished."""


class PngFolderSink(Sink):
    """Frames as `000000.png, 000001.png, …` named by frame index; RGBA when a frame has alpha.

    Naming by index (not by count) lets a resumed run fill in exactly the missing frames.
    """

    def __init__(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VlrtError(
                f"cannot create output folder '{folder}' ({exc.strerror}): choose a writable place"
            ) from exc
        self.folder = folder
        super().__init__()

    def _write_now(self, frame: Frame) -> None:
        write_png(self.folder / f"{frame.index:06d}.png", frame.image, frame.alpha)


class _EncodedSink(Sink):
    """A sink that feeds a `VideoEncoder`."""

    def __init__(self, encoder: VideoEncoder) -> None:
        self._encoder = encoder
        super().__init__()

    def _write_now(self, frame: Frame) -> None:
        self._encoder.write(frame)

    def _finish(self) -> None:
        self._encoder.finish()

    def _discard(self) -> None:
        self._encoder.discard()


class VideoFileSink(Sink):
    """A video file, encoded in parts beside it and joined into place by `close()`.

    `resume_at` continues the parts an interrupted render left (see `finished_frames`); 0
    starts afresh. A kill at any moment leaves no file at `path`, only whole parts.
    """

    def __init__(
        self, path: Path, encoder_args: dict, audio_from: Path | None, resume_at: int = 0,
        times: list[Fraction] | None = None,
    ) -> None:
        self._muxer = file_muxer(path)
        self._times = times
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VlrtError(
                f"cannot create the folder of output '{path}' ({exc.strerror}): choose a writable place"
            ) from exc
        self.path = path
        self._fps = encoder_args["fps"]
        self._audio_from = audio_from
        self._folder = parts_folder(path)
        self._label = f"'{path}'"
        self._parts = PartWriter(self._folder, resume_at, part_encoders(self._muxer, encoder_args, self._label), self._label)
        super().__init__()

    def _write_now(self, frame: Frame) -> None:
        self._parts.write(frame)

    def _finish(self) -> None:
        self._parts.finish()
        parts = tidy_parts(self._folder)
        if not parts:
            raise VlrtError(f"no frames were rendered, so output {self._label} was not written: check the input")
        if parts[-1].first + parts[-1].frames != self._parts.next_index:
            raise VlrtError(
                f"the parts of output {self._label} changed while it was rendered (another render of the same "
                "output?): render again without --resume"
            )
        join_video(parts, self.path, self._fps, self._audio_from, self._times)

    def _discard(self) -> None:
        self._parts.discard()


def join_video(
    parts: list[Part], path: Path, fps: Fraction, audio_from: Path | None, times: list[Fraction] | None = None
) -> None:
    """Join whole parts (frames 0, 1, … in order) into video file `path` with the sound of `audio_from`,
    without re-encoding, each frame at its time in `times` when given (a variable rate); then remove
    the parts folder. Nothing is left at `path` on failure."""
    muxer, label, folder = file_muxer(path), f"'{path}'", parts_folder(path)
    joined = folder / f"{path.name}.tmp"
    options = {"movflags": "+faststart"} if muxer in ("mp4", "mov") else {}
    try:
        join_parts(parts, joined, muxer=muxer, fps=fps, audio_from=audio_from, options=options, label=label, times=times)
        commit(joined, path)
    except BaseException:
        joined.unlink(missing_ok=True)
        raise
    shutil.rmtree(folder)


class SegmentSink(Sink):
    """Frames `start` … `stop − 1` of video file `path` as one segment's parts, written by one
    task of a segment-parallel render; `close()` seals the segment (`vlrt.io.segment_parts`)."""

    def __init__(self, path: Path, start: int, stop: int, encoder_args: dict) -> None:
        label = f"'{path}' (frames {start}-{stop - 1})"
        self._start, self._frames, self._label = start, stop - start, label
        self._folder = attempt_folder(path, start, stop)
        self._sealed_as = segment_folder(path, start, stop)
        self._parts = PartWriter(self._folder, 0, part_encoders(file_muxer(path), encoder_args, label), label)
        super().__init__()

    def _write_now(self, frame: Frame) -> None:
        self._parts.write(replace(frame, index=frame.index - self._start))

    def _finish(self) -> None:
        self._parts.finish()
        if self._parts.next_index != self._frames:
            raise VlrtError(f"output {self._label} got {self._parts.next_index} of its {self._frames} frames: render again")
        seal(self._folder, self._sealed_as)

    def _discard(self) -> None:
        self._parts.discard()
        shutil.rmtree(self._folder, ignore_errors=True)


class PipeVideoSink(_EncodedSink):
    """A streamable container on standard output, flushed after every frame."""

    def __init__(self, stream: BinaryIO, muxer: str, encoder_args: dict) -> None:
        # Matroska closes a cluster only when the next packet arrives; the smallest cluster
        # limit makes that every frame, so a reader lags by one frame, not several seconds.
        options = {"cluster_size_limit": "0"} if muxer == "matroska" else {}
        super().__init__(
            VideoEncoder(
                PipeWriter(stream), "standard output", muxer=muxer, pipe=True, container_options=options,
                buffer_size=PIPE_BUFFER_BYTES, **encoder_args,
            )
        )


class RawPipeSink(Sink):
    """Bare rgb24 bytes on standard output (alpha dropped), flushed after every frame."""

    def __init__(self, stream: BinaryIO) -> None:
        self._pipe = PipeWriter(stream)
        self._size: tuple[int, int] | None = None
        super().__init__()

    def _write_now(self, frame: Frame) -> None:
        if self._size is None:
            self._size = (frame.width, frame.height)
        elif (frame.width, frame.height) != self._size:
            width, height = self._size
            raise ValueError(f"frame {frame.index} is {frame.width}x{frame.height}, the stream is {width}x{height}")
        self._pipe.write(frame.image.tobytes())
        self._pipe.flush()


def _is_folder_spec(spec: str) -> bool:
    return spec.endswith(("/", os.sep)) or Path(spec).is_dir()


def open_sink(
    spec: str,
    *,
    fps: Fraction,
    audio_from: Path | None = None,
    codec: str | None = None,
    crf: float = 17,
    lossless: bool = False,
    output_format: str | None = None,
    stdout: BinaryIO | None = None,
    resume_at: int = 0,
    segment: tuple[int, int] | None = None,
    times: list[Fraction] | None = None,
) -> Sink:
    """Open OUTPUT: a video file (format by extension), a folder for PNGs, or "-" for stdout.

    `audio_from` (a file output only) carries that file's sound into the video, cut to its
    length. Standard output takes `output_format` nut (default), matroska, mpegts, y4m or
    rawvideo, lossless unless `codec` says otherwise. See `vlrt.io.encoding` for the codecs.
    `resume_at` (a file output only) continues an interrupted render: it must be what
    `finished_frames` counts, and the first frame written is then frame `resume_at`. A folder
    resumes by itself (frames are files named by index). `segment` (start, stop) takes only
    those frames, for one task of a segment-parallel render: a folder gets them as PNGs, a video
    file as a segment's parts (`SegmentSink`), joined later by `join_video`. `times` (a video file
    only) shows each frame at its source time, for a source of variable frame rate.
    """
    if not fps or fps <= 0:
        raise VlrtError(f"output frame rate must be positive, got {fps}: set output_frame_rate")
    encoder_args = {"fps": Fraction(fps), "codec": codec, "crf": crf, "lossless": lossless}
    if spec == "-":
        stream = stdout if stdout is not None else sys.stdout.buffer
        if output_format == "rawvideo":
            return RawPipeSink(stream)
        return PipeVideoSink(stream, pipe_muxer(output_format), encoder_args)
    if _is_folder_spec(spec):
        return PngFolderSink(Path(spec))
    if segment is not None:
        return SegmentSink(Path(spec), *segment, encoder_args)
    return VideoFileSink(Path(spec), encoder_args, audio_from, resume_at, times)


def check_output_spec(
    spec: str, *, codec: str | None = None, crf: float = 17, lossless: bool = False, output_format: str | None = None
) -> None:
    """Fail on an output `open_sink` could not write (unknown extension or pipe format, a missing or
    non-lossless encoder) before anything is loaded or written."""
    if spec == "-":
        if output_format != "rawvideo":
            choose_encoding(pipe_muxer(output_format), pipe=True, codec=codec, lossless=lossless, crf=crf, alpha=False)
    elif not _is_folder_spec(spec):
        choose_encoding(file_muxer(Path(spec)), pipe=False, codec=codec, lossless=lossless, crf=crf, alpha=False)


def finished_frames(path: Path) -> int:
    """How many frames, from the first on, an interrupted render into video file `path` holds.

    They are the whole parts without a gap; what a resumed render cannot use is deleted.
    `open_sink(..., resume_at=finished_frames(path))` continues from there.
    """
    return sum(part.frames for part in tidy_parts(parts_folder(path)))
