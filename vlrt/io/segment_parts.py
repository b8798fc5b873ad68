"""A segment's share of a video-file output, kept apart until the segment is whole.

A segment-parallel render (`vlrt.scale.distributed`) of `out.mp4` keeps, in the output's parts folder
(`.out.mp4.parts/`, see `vlrt.io.parts`), one folder per finished segment:
`segment-00000030-00000060/` for frames 30 … 59, holding that segment's parts as `PartWriter`
writes them, numbered from the segment's first frame (`00000000.mkv`, `00000032.mkv`, …). Each
attempt at a segment writes into a folder of its own, `.segment-00000030-00000060.<random>.partial/`,
and renames it to the segment's name only once every frame is in a closed part. So the name always
means a whole segment: a killed attempt, a retry, or a late duplicate from an abandoned run can never
make half a segment look finished, nor write into another attempt's folder. The driver joins the
parts of all segments in order, each shifted to its segment's place, without re-encoding
(`vlrt.io.sinks.join_video`).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from vlrt.io.parts import Part, parts_folder, tidy_parts


def segment_folder(output: Path, start: int, stop: int) -> Path:
    """Where the parts of the finished segment of frames [start, stop) of `output` are."""
    return parts_folder(output) / f"segment-{start:08d}-{stop:08d}"


def attempt_folder(output: Path, start: int, stop: int) -> Path:
    """A new folder for one attempt at that segment (hidden, unique, same file system)."""
    final = segment_folder(output, start, stop)
    return final.with_name(f".{final.name}.{uuid.uuid4().hex}.partial")


def seal(attempt: Path, final: Path) -> None:
    """Make an attempt's folder (its parts closed and on disk) the segment's, in one rename.

    When another attempt sealed the same segment first, that one stays and this one is dropped:
    both hold the same frames."""
    try:
        os.rename(attempt, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(attempt)
        return
    descriptor = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself reaches the disk
    finally:
        os.close(descriptor)


def segment_parts(output: Path, start: int, stop: int) -> list[Part] | None:
    """The parts of the finished segment [start, stop) of `output`, placed at its frames; None when
    it is not finished (a damaged one is deleted, to be rendered again)."""
    folder = segment_folder(output, start, stop)
    if not folder.is_dir():
        return None
    parts = tidy_parts(folder)
    if sum(part.frames for part in parts) != stop - start:
        shutil.rmtree(folder)
        return None
    return [Part(part.path, start + part.first, part.frames) for part in parts]


def keep_only(output: Path, segments: list[tuple[int, int]]) -> None:
    """Delete from `output`'s parts folder everything but the finished segments among `segments`:
    abandoned attempts, segments of another split, parts of a render without segments."""
    folder = parts_folder(output)
    if not folder.is_dir():
        return
    wanted = {segment_folder(output, start, stop).name for start, stop in segments}
    for path in folder.iterdir():
        if path.name in wanted and path.is_dir():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
