"""A video-file output kept as a folder of short, whole parts, so a killed render can resume.

Layout: beside `out.mp4`, the hidden folder `.out.mp4.parts/` holds `00000000.mkv`,
`00000032.mkv`, …: each part is named by the index of its first frame and holds the next
`PART_FRAMES` frames (the last part fewer). Each one is a complete Matroska file from its own
encoder session with the codec settings of the final file, so it starts with a keyframe and
decodes on its own; Matroska takes every codec vlrt writes. A part is written as `NAME.tmp`
and renamed only once it is closed and on disk, so a part's name always means a whole part:
after a SIGKILL the folder holds whole parts and at most one `.tmp`. The sink's `close()`
joins the parts into the output without re-encoding (`vlrt.io.join`) and deletes the folder.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.io.video_out import VideoEncoder

# Frames per part. A kill loses at most this many encoded frames (plus the frames still inside
# the pipeline), which `--resume` renders again. Every part starts with a keyframe, so smaller
# parts cost bitrate and encoder start-ups: 32 frames is 1.3 s at 24 fps, about the keyframe
# interval of streaming video.
PART_FRAMES = 32
PART_FORMAT = "matroska"
_PART_NAME = re.compile(r"(\d{8})\.mkv")
_TMP = ".tmp"


@dataclass(frozen=True)
class Part:
    """One whole part: frames `first` … `first + frames - 1` of the output."""

    path: Path
    first: int
    frames: int


def parts_folder(output: Path) -> Path:
    """The hidden folder beside `output` (same file system, so renames out of it are atomic)."""
    return output.with_name(f".{output.name}.parts")


def part_path(folder: Path, first: int) -> Path:
    return folder / f"{first:08d}.mkv"


def part_encoders(muxer: str, encoder_args: dict, label: str) -> Callable[[Path], VideoEncoder]:
    """A new encoder for each part of a `muxer` output: the final file's codec choice in a part's container."""

    def new_encoder(target: Path) -> VideoEncoder:
        return VideoEncoder(str(target), label, muxer=muxer, container=PART_FORMAT, pipe=False, **encoder_args)

    return new_encoder


def commit(written: Path, final: Path) -> None:
    """Put a finished file in place: its data reaches the disk before the name says it is whole."""
    with open(written, "rb") as file:
        os.fsync(file.fileno())
    os.replace(written, final)


def _count_frames(path: Path) -> int | None:
    """Video packets (one per frame) in a part, or None when it cannot be read."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.error.FFmpegError, OSError, IndexError):
        return None


def tidy_parts(folder: Path) -> list[Part]:
    """The whole parts holding frames 0, 1, … without a gap.

    Deletes what a resumed render cannot use: `.tmp` files (cut off by a kill), and parts after
    a gap or an unreadable part, which the resumed render writes again.
    """
    if not folder.is_dir():
        return []
    named = {}
    for path in folder.iterdir():
        if path.name.endswith(_TMP):
            path.unlink()
        elif match := _PART_NAME.fullmatch(path.name):
            named[int(match.group(1))] = path
    parts: list[Part] = []
    following = 0
    for first in sorted(named):
        frames = _count_frames(named[first]) if first == following else None
        if not frames:
            named[first].unlink()
            continue
        parts.append(Part(named[first], first, frames))
        following = first + frames
    return parts


def _holds_parts(folder: Path) -> bool:
    return folder.is_dir() and any(_PART_NAME.fullmatch(path.name) for path in folder.iterdir())


class PartWriter:
    """Encodes frames `start`, `start + 1`, … into parts in `folder`, one encoder per part.

    `start` 0 begins afresh, deleting parts an earlier render left; any other `start` must be
    where the whole parts already there end (what `tidy_parts` counts).
    """

    def __init__(self, folder: Path, start: int, new_encoder: Callable[[Path], VideoEncoder], label: str) -> None:
        self._folder, self._new_encoder = folder, new_encoder
        self._first = self.next_index = start
        self._encoder = new_encoder(self._tmp())  # checks the codec choice before the folder is touched
        self._size: tuple[int, int] | None = None
        if start == 0:
            if folder.exists():
                shutil.rmtree(folder)
        else:
            finished = sum(part.frames for part in tidy_parts(folder))
            if finished != start:
                raise VlrtError(
                    f"cannot resume output {label} at frame {start}: its finished parts in '{folder}' hold "
                    f"{finished} frames; render again without --resume"
                )
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VlrtError(f"cannot create '{folder}' for output {label} ({exc.strerror}): choose a writable place") from exc

    def _tmp(self) -> Path:
        path = part_path(self._folder, self._first)
        return path.with_name(path.name + _TMP)

    def write(self, frame: Frame) -> None:
        """Encode `frame` (the next index is due); close the part when it is full."""
        if frame.index != self.next_index:
            raise ValueError(f"frame {frame.index} was given where frame {self.next_index} is due")
        if self._size is None:
            self._size = (frame.width, frame.height)
        elif (frame.width, frame.height) != self._size:  # each part's encoder only sees its own frames
            width, height = self._size
            raise ValueError(f"frame {frame.index} is {frame.width}x{frame.height}, the video is {width}x{height}")
        self._encoder.write(frame)
        self.next_index += 1
        if self.next_index - self._first == PART_FRAMES:
            self._seal()

    def _seal(self) -> None:
        self._encoder.finish()
        commit(self._tmp(), part_path(self._folder, self._first))
        self._first = self.next_index
        self._encoder = self._new_encoder(self._tmp())

    def finish(self) -> None:
        """Close the last, shorter part."""
        if self._encoder.frames_written:
            self._seal()

    def discard(self) -> None:
        """Drop the part being written; keep whole parts for `--resume`, the folder only if it has one."""
        self._encoder.discard()
        self._tmp().unlink(missing_ok=True)
        if not _holds_parts(self._folder):
            shutil.rmtree(self._folder, ignore_errors=True)
