"""Pictures for tuning: the render preview (a few inputs above the same frames rendered) and
the contact sheet of a parameter sweep (`vlrt preview`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from vlrt.frames import Frame
from vlrt.image.contact_sheet import contact_sheet
from vlrt.settings.config import Settings, build_settings
from vlrt.settings.controlnet import with_unit_value

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
                self.inputs[frame.index] = frame.on_host().image
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


def parse_sweep(text: str) -> tuple[str, list[object]]:
    """`name=v1,v2,…` (or `name=a|b` when values hold commas) to the name and typed values."""
    import tomllib

    from vlrt.errors import VlrtError

    name, sep, values = text.partition("=")
    if not sep or not values:
        raise VlrtError(f"--sweep {text!r} is not NAME=V1,V2: e.g. --sweep superimpose_alpha=0.15,0.25")
    parts = values.split("|") if "|" in values else values.split(",")

    def typed(value: str) -> object:
        try:
            return tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            return value.strip()

    return name.strip().replace("-", "_"), [typed(v) for v in parts]


def apply_sweep(settings: Settings, name: str, value: object) -> Settings:
    """`settings` with one sweep value applied and checked (an unknown name or a wrong type fails before any work);
    `controlnet.I.NAME` changes one field of ControlNet unit I."""
    if name.startswith("controlnet."):
        return replace(settings, controlnet=with_unit_value(settings.controlnet, name, value))
    build_settings(overrides={name: value})
    return replace(settings, **{name: value})


def sweep_grid(
    settings_rows: list[tuple[str, object]],
    frames: list[int],
    render_frame: Callable[[object, int], dict[int, np.ndarray]],
    show_loops: bool,
) -> Image.Image:
    """The contact sheet of a sweep: a row per setting combination (per loop pass with `show_loops`),
    a column per frame. `render_frame(settings, f)` returns {pass number: picture} for frame f."""
    rows: list[list[np.ndarray]] = []
    labels: list[str] = []
    for label, settings in settings_rows:
        per_frame = [render_frame(settings, f) for f in frames]
        passes = sorted(per_frame[0]) if show_loops else [max(per_frame[0])]
        for p in passes:
            rows.append([pictures[p] for pictures in per_frame])
            labels.append(f"{label} L{p}" if show_loops else label)
    return contact_sheet(rows, labels, [f"frame {f}" for f in frames])
