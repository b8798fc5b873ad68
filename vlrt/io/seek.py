"""Frame-accurate seeking in a video file, so that a segment decodes from near its first frame.

A video's frames are numbered in presentation order from the first one the decoder gives. The
demuxer alone (no decoding) lists every video packet's presentation timestamp; sorted, the k-th
of them is frame k's. To start at frame k the container seeks to the last keyframe at or before
that time, and the frames decoded from there are numbered by their timestamps; those before k are
dropped. Decoding from a keyframe gives the same pictures as decoding from the start, except for
the leading pictures of an open GOP (shown before their keyframe, predicted from the GOP before
it), so the seek counts only when a keyframe no later than frame k is decoded before frame k
comes, and every timestamp decoded is one of the listed ones. Otherwise (a demuxer that seeks too
far, a stream without timestamps, timestamps that repeat) the file is decoded from its start and
the first k frames are dropped, which is slow but always right.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from itertools import islice

import av

from vlrt.errors import VlrtError
from vlrt.io.video_in import decoded_frames, open_video


def _packet_times(path: str, label: str, format: str | None) -> list[int | None]:
    """The presentation timestamp of every frame-carrying video packet, read by the demuxer without decoding."""
    with open_video(path, label, format=format) as container:
        stream = container.streams.video[0]
        return [packet.pts for packet in container.demux(stream) if packet.size and not packet.is_discard]


def frame_times(path: str, label: str, format: str | None = None) -> list[int] | None:
    """The presentation timestamps of the video's frames in order, or None when they cannot number them."""
    times = _packet_times(path, label, format)
    if any(t is None for t in times) or len(set(times)) != len(times):
        return None
    return sorted(times)


def variable_frame_times(
    path: str, label: str, format: str | None, time_base: Fraction, start_time: int | None
) -> list[Fraction] | None:
    """Each frame's time in seconds from the video stream's start when the steps between frames vary
    (phones, screen recorders), None when they are all equal within a tick or the timestamps cannot
    number the frames."""
    times = frame_times(path, label, format)
    if times is None or len(times) < 3:
        return None
    steps = [b - a for a, b in zip(times, times[1:])]
    if max(steps) - min(steps) <= 1:
        return None
    origin = times[0] if start_time is None else start_time
    return [(t - origin) * time_base for t in times]


def count_video_frames(path: str, label: str, format: str | None = None) -> int:
    """How many frames the video holds: its packets, counted without decoding."""
    return len(_packet_times(path, label, format))


def frames_from(path: str, label: str, first: int, format: str | None = None) -> Iterator[av.VideoFrame]:
    """The decoded frames of video file `path` (demuxer `format`, default by probing) from frame `first` (0-based) on."""
    times = frame_times(path, label, format) if first > 0 else None
    if times is not None and first >= len(times):
        return
    if times is not None:
        index_of = {t: i for i, t in enumerate(times)}
        back = 0
        while back < first:
            frames = _seeked(path, label, format, times, index_of, first, first - back)
            if frames is not None:
                yield from frames
                return
            back = max(32, 2 * back)
    decoded = decoded_frames(open_video(path, label, format=format), label)
    try:
        yield from islice(decoded, first, None)
    finally:
        decoded.close()


def _seeked(
    path: str, label: str, format: str | None, times: list[int], index_of: dict[int, int], first: int, anchor: int
) -> Iterator[av.VideoFrame] | None:
    """The frames from `first` on after a seek near frame `anchor`, or None when the seek did not land right."""
    container = open_video(path, label, format=format)
    try:
        container.seek(times[anchor], stream=container.streams.video[0], backward=True, any_frame=False)
    except av.error.FFmpegError:
        container.close()
        return None
    decoded = decoded_frames(container, label)
    keyframe_seen = False
    for frame in decoded:
        index = index_of.get(frame.pts)
        if index is None or index > first:
            break
        keyframe_seen = keyframe_seen or frame.key_frame
        if index == first:
            if keyframe_seen:
                return _in_order(frame, decoded, index_of, label)
            break
    decoded.close()
    return None


def _in_order(
    frame: av.VideoFrame, rest: Iterator[av.VideoFrame], index_of: dict[int, int], label: str
) -> Iterator[av.VideoFrame]:
    """`frame` and the frames decoded after it, each checked to be the next one."""
    try:
        expected = index_of[frame.pts]
        yield frame
        for frame in rest:
            expected += 1
            if index_of.get(frame.pts) != expected:
                raise VlrtError(
                    f"{label}: frame {expected} did not decode after a seek (a damaged frame?): "
                    "re-encode the video, or render without --segments"
                )
            yield frame
    finally:
        rest.close()
