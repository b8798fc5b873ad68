"""The render preview: a few input frames above the same frames rendered, in one PNG."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlrt.contact_sheet import contact_sheet
from vlrt.frames import Frame

COLUMNS = 4


class PreviewCollector:
    """Keeps the inputs and outputs of a few evenly spaced frames (the first ones when the length is unknown)."""

    def __init__(self, frame_count: int | None) -> None:
        if frame_count:
            self.indices = sorted({round(i * (frame_count - 1) / max(COLUMNS - 1, 1)) for i in range(COLUMNS)})
        else:
            self.indices = [i * 10 for i in range(COLUMNS)]
        self.inputs: dict[int, np.ndarray] = {}
        self.outputs: dict[int, np.ndarray] = {}

    def watch_inputs(self, frames: Iterator[Frame]) -> Iterator[Frame]:
        for frame in frames:
            if frame.index in self.indices:
                self.inputs[frame.index] = frame.image
            yield frame

    def see_output(self, frame: Frame) -> None:
        if frame.index in self.indices:
            self.outputs[frame.index] = frame.image

    def save(self, path: Path) -> None:
        shown = [i for i in self.indices if i in self.inputs and i in self.outputs]
        if not shown:
            return
        sheet = contact_sheet(
            [[self.inputs[i] for i in shown], [self.outputs[i] for i in shown]],
            ["input", "output"],
            [f"frame {i}" for i in shown],
        )
        tmp = path.with_name(path.name + ".partial.png")
        sheet.save(tmp)
        tmp.replace(path)
