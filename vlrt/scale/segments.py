"""Splitting a render into contiguous segments, each with the halo its frames depend on (DESIGN.md §8).

A segment owns output frames [start, stop). An output frame depends on the input frames within the
pipeline's reach of it (`pipeline.pipeline_reach`: every loop pass's temporal radius, plus
FastDVDNet's 2 when it is on, times the number of passes), so a segment reads and renders the inputs
[start − reach, stop + reach), cut at the ends of the video, and keeps only its own frames. Where the
halo is cut by the video's ends the edge rules apply exactly as in a whole render; elsewhere the
frames of the halo come out approximate (the stages treat their first frame as the video's start),
and they are exactly the ones dropped. Every random draw depends only on (seed, frame, pass, sample),
so the kept frames are those of a single render.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def split(total: int, count: int, reach: int) -> list[Segment]:
    """`total` frames in `count` contiguous segments whose lengths differ by at most one, each with
    `reach` frames of halo on both sides; never more segments than frames."""
    if total < 1 or count < 1 or reach < 0:
        raise ValueError(f"cannot split {total} frames into {count} segments with reach {reach}")
    count = min(count, total)
    bounds = [k * total // count for k in range(count + 1)]
    return [
        Segment(k, start, stop, max(0, start - reach), min(total, stop + reach))
        for k, (start, stop) in enumerate(zip(bounds, bounds[1:]))
    ]


def halo_overhead(segments: list[Segment]) -> float:
    """Frames rendered and dropped per output frame: what segmenting costs over one render."""
    return sum(s.halo for s in segments) / sum(s.frames for s in segments)
