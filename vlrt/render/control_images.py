"""Each frame's ControlNet control maps, from the ORIGINAL frames as the extension feeds them (SPEC.md §2.3 step 7).

Unit i takes frame k's image from its own `image_dir` when it names one, else from the i-th
`!!!` part of `reference_frames_directory`, else (no reference folders) the original input frame
itself; folders are listed in natural order and subsampled like the input (`extract_nth_frame`,
`max_frames`). The map is made once per frame, at render size with the unit's resize mode and
through its preprocessor, and travels with the frame, so every loop pass sees the same original
map, never a pass's output. Files are read one frame at a time, by index, so memory stays bounded
and a render can start at any frame (`--segments`, `--resume`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.image.control_maps import control_map
from vlrt.image.resize import resize_plane
from vlrt.image.temporal_diff import REFERENCE_SEPARATOR, reference_lists
from vlrt.io.images import read_image
from vlrt.settings.config import Settings


class ControlImages:
    """The control maps of the frames of one input at width×height, one per unit."""

    def __init__(self, settings: Settings, n_frames: int | None, width: int, height: int) -> None:
        """`n_frames`: the input's exact frame count where known, so that short folders fail before any work."""
        self.units, self.width, self.height = settings.controlnet, width, height
        parts = reference_lists(settings.reference_frames_directory, settings.extract_nth_frame, settings.max_frames, n_frames)
        self.sources: list[list[Path] | None] = []
        for i, unit in enumerate(self.units):
            if unit.image_dir:
                self.sources += reference_lists(unit.image_dir, settings.extract_nth_frame, settings.max_frames, n_frames)[:1]
            elif not parts:
                self.sources.append(None)
            elif i < len(parts):
                self.sources.append(parts[i])
            else:
                raise VlrtError(
                    f"ControlNet unit {i + 1} has no reference folder: reference_frames_directory has {len(parts)} "
                    f"part(s); give one folder per unit separated by '{REFERENCE_SEPARATOR}', or the unit's image_dir"
                )

    def __call__(self, frame: Frame) -> tuple[np.ndarray, ...]:
        """Frame `frame`'s control map (H, W, 3) uint8 of every unit; `frame` is the original at render size."""
        maps = []
        for unit, paths in zip(self.units, self.sources):
            if paths is None:
                image = frame.image
            else:
                if frame.index >= len(paths):
                    raise VlrtError(
                        f"ControlNet folder '{Path(paths[0]).parent}' has {len(paths)} frames but the input has more "
                        f"(frame {frame.index + 1}): give a control image for every input frame"
                    )
                rgb, _ = read_image(paths[frame.index])
                image = np.asarray(resize_plane(Image.fromarray(rgb), self.width, self.height, unit.resize))
            maps.append(control_map(image, unit.module, unit.threshold_a, unit.threshold_b))
        return tuple(maps)
