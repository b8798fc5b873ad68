"""The frame counts of a segment-parallel render's tasks, kept by a Ray actor for the driver's progress bar.

Its own module, importing nothing heavy: an actor runs in a process of its own, which imports the
module of its class, and this one starts in a moment where `vlrt.scale.distributed` would load torch.
"""

from __future__ import annotations


class FrameCounter:
    """Frames finished per segment, as the tasks report them (a retried segment starts again from 0)."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def report(self, segment: int, frames: int) -> None:
        self.done[segment] = frames

    def frames(self) -> dict[int, int]:
        return self.done
