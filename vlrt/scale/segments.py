"""Splitting a render into contiguous segments, each with the halo its frames depend on (DESIGN.md §8).

A segment owns output frames [start, stop). An output frame depends on the input frames within the
pipeline's reach of it (`pipeline.pipeline_reach`: every loop pass's temporal radius, plus
FastDVDNet's 2 when it is on, times the number of passes), so a segment reads and renders the inputs
[start − reach, stop + reach), cut at the ends of the video, and keeps only its own frames. Where the
halo is cut by the video's ends the edge rules apply exactly as in a whole render; elsewhere the
frames of the halo come out approximate (the stages treat their first frame as the video's start),
and they are exactly the ones dropped. Every random draw depends only on (seed, frame, pass, sample),
so the kept frames are those of a single render. Scene cuts end a segment's reads: its frames
depend on their own shot only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlrt.image.scene_cuts import span_reads


@dataclass(frozen=True)
class Segment:
    """Output frames [start, stop), rendered from inputs [read_start, read_stop)."""

    index: int
    start: int
    stop: int
    read_start: int
    read_stop: int

    @property
    def frames(self) -> int:
        return self.stop - self.start

    @property
    def halo(self) -> int:
        """Frames this segment renders only to drop them (on both sides)."""
        return self.read_stop - self.read_start - self.frames


def split(total: int, count: int, reach: int, cuts: Sequence[int] = ()) -> list[Segment]:
    """`total` frames in `count` contiguous segments whose lengths differ by at most one, each with
    `reach` frames of halo on both sides; never more segments than frames.

    A border with a scene cut within a quarter of a segment's length moves onto the nearest such
    cut: nothing crosses a cut, so neither segment needs a halo there (`span_reads`)."""
    if total < 1 or count < 1 or reach < 0:
        raise ValueError(f"cannot split {total} frames into {count} segments with reach {reach}")
    count = min(count, total)
    bounds = [k * total // count for k in range(count + 1)]
    near = total // count // 4
    for k in range(1, count):
        close = [c for c in cuts if abs(c - bounds[k]) <= near and bounds[k - 1] < c < bounds[k + 1]]
        if close:
            bounds[k] = min(close, key=lambda c: (abs(c - bounds[k]), c))
    return [
        Segment(k, start, stop, *span_reads(start, stop, reach, cuts, total))
        for k, (start, stop) in enumerate(zip(bounds, bounds[1:]))
    ]


def halo_overhead(segments: list[Segment]) -> float:
    """Frames rendered and dropped per output frame: what segmenting costs over one render."""
    return sum(s.halo for s in segments) / sum(s.frames for s in segments)
