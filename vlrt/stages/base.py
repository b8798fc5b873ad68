"""What every pipeline stage offers the driver.

A stage receives frames in index order from `first` on (`push`), learns that no more will come
(`close`), and hands back finished frames in index order (`pop`). A stage that starts at
`first > 0` (a resumed render, a segment) treats `first` as the start of the video; the frames
it makes within its `reach` of that start are then approximate, and the driver drops them. It holds only a small ring buffer of the
frames it still needs, so memory does not grow with the length of the video. Work on engines
goes through the executor as jobs; `pop` is where a stage notices finished jobs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from vlrt.frames import Frame


class Stage(ABC):
    """A streaming transformation of a sequence of frames."""

    name = "stage"

    reach = 0
    """How far (in frames, each way) an output frame depends on this stage's inputs."""

    def __init__(self, first: int = 0) -> None:
        self.first = first
        self.received = first
        self.emitted = first
        self.closed = False

    def push(self, frame: Frame) -> None:
        if frame.index != self.received:
            raise RuntimeError(f"{self.name}: frame {frame.index} arrived, expected {self.received}")
        self.received += 1
        self._accept(frame)

    def close(self) -> None:
        self.closed = True

    def pop(self) -> list[Frame]:
        """Start whatever work has become possible and return the frames that are finished."""
        out = self._advance()
        self.emitted += len(out)
        return out

    @property
    def finished(self) -> bool:
        return self.closed and self.emitted == self.received

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Frames this stage may need to hold before it can emit one; the driver admits up to the sum."""

    @property
    def held(self) -> int:
        """Frames received but not yet emitted (the driver bounds this)."""
        return self.received - self.emitted

    @abstractmethod
    def _accept(self, frame: Frame) -> None: ...

    @abstractmethod
    def _advance(self) -> list[Frame]: ...
