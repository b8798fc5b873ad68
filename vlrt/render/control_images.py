"""Each frame's ControlNet control maps, from the ORIGINAL frames as the extension feeds them (SPEC.md §2.3 step 7).

Unit i takes frame k's image from its own `image_dir` when it names one (a folder of images or a
video file), else from the i-th `!!!` part of `reference_frames_directory`, else (no reference
folders) the original input frame itself; folders are listed in natural order and subsampled like
the input (`extract_nth_frame`, `max_frames`), and so are a video's frames. The map is made once per
frame, at render size with the unit's resize mode and through its preprocessor, and travels with the
frame, so every loop pass sees the same original map, never a pass's output.

Memory stays bounded and a render can start at any frame (`--segments`, `--resume`): folder images
are read one at a time by index; a video is opened with the input's own sources (`vlrt.io.sources`)
at the first frame asked for, seeking there frame-accurately, and decoded on from it a few frames
ahead. A control source with fewer frames than the input is an error naming it before any work
where the input's length is known (image folders), else when the render reaches its end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.image.annotators import Annotators
from vlrt.image.control_maps import control_map
from vlrt.image.resize import resize_plane
from vlrt.image.temporal_diff import REFERENCE_SEPARATOR, reference_lists
from vlrt.io.images import animation_durations, is_image_file, read_image
from vlrt.io.sources import Source, open_source
from vlrt.settings.config import Settings


class FolderControl:
    """A unit's control images from a folder's files, read by frame index."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def image(self, index: int) -> np.ndarray:
        if index >= len(self.paths):
            raise VlrtError(
                f"ControlNet folder '{Path(self.paths[0]).parent}' has {len(self.paths)} frames but the input has more "
                f"(frame {index + 1}): give a control image for every input frame"
            )
        rgb, _ = read_image(self.paths[index])
        return rgb

    def close(self) -> None:
        pass


class VideoControl:
    """A unit's control images from a video file, decoded in order from the first frame asked for; a frame
    out of that order (a second span of the same render) reopens the video there."""

    def __init__(self, path: Path, settings: Settings, n_frames: int | None) -> None:
        self.path, self.settings = path, settings
        with self._open(0, exact_count=True) as source:  # checks the file and counts its frames (packets, no decoding)
            self.count = source.info.frame_count
        if n_frames is not None and self.count is not None and self.count < n_frames:
            raise VlrtError(self._short(n_frames))
        self._source: Source | None = None
        self._frames: Iterator[Frame] | None = None
        self._next = -1

    def _open(self, start: int, exact_count: bool = False) -> Source:
        return open_source(
            str(self.path), extract_nth_frame=self.settings.extract_nth_frame, max_frames=self.settings.max_frames,
            start=start, exact_count=exact_count, deinterlace=self.settings.deinterlace != "off",
        )

    def _short(self, needed: int) -> str:
        return (f"ControlNet video '{self.path}' has {self.count} frames (after extract_nth_frame/max_frames) but the "
                f"input has {needed}: give a control image for every input frame")

    def image(self, index: int) -> np.ndarray:
        if self._frames is None or index != self._next:
            self.close()
            if self.count is not None and index >= self.count:
                raise VlrtError(self._short(index + 1))
            self._source = self._open(index)
            self._frames = iter(self._source)
        frame = next(self._frames, None)
        if frame is None:
            raise VlrtError(self._short(index + 1))
        self._next = index + 1
        return frame.image

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
        self._source, self._frames = None, None


def control_source(spec: str, settings: Settings, n_frames: int | None) -> FolderControl | VideoControl:
    """A unit's `image_dir`: a folder of images or a video file (an animated GIF/APNG/WebP counts as one)."""
    path = Path(spec).expanduser()
    if path.is_file():
        if is_image_file(path) and animation_durations(path) is None:
            raise VlrtError(
                f"ControlNet image_dir '{spec}' is one picture: give a folder with a control image per frame, or a video file"
            )
        return VideoControl(path, settings, n_frames)
    if not path.exists():
        raise VlrtError(f"ControlNet image_dir '{spec}' does not exist: give a folder of control images or a video file")
    return FolderControl(reference_lists(str(path), settings.extract_nth_frame, settings.max_frames, n_frames)[0])


class ControlImages:
    """The control maps of the frames of one input at width×height, one per unit."""

    def __init__(
        self, settings: Settings, n_frames: int | None, width: int, height: int, device: torch.device | None = None
    ) -> None:
        """`n_frames`: the input's exact frame count where known, so that short sources fail before any work."""
        self.units, self.width, self.height = settings.controlnet, width, height
        self.annotators = Annotators(settings.annotators_dir, device)
        for unit in self.units:
            self.annotators.prepare(unit.module)  # a missing package or weight file fails before any work
        parts = reference_lists(settings.reference_frames_directory, settings.extract_nth_frame, settings.max_frames, n_frames)
        self.sources: list[FolderControl | VideoControl | None] = []
        for i, unit in enumerate(self.units):
            if unit.image_dir:
                self.sources.append(control_source(unit.image_dir, settings, n_frames))
            elif not parts:
                self.sources.append(None)
            elif i < len(parts):
                self.sources.append(FolderControl(parts[i]))
            else:
                self.close()
                raise VlrtError(
                    f"ControlNet unit {i + 1} has no reference folder: reference_frames_directory has {len(parts)} "
                    f"part(s); give one folder per unit separated by '{REFERENCE_SEPARATOR}', or the unit's image_dir"
                )

    def __call__(self, frame: Frame) -> tuple[np.ndarray, ...]:
        """Frame `frame`'s control map (H, W, 3) uint8 of every unit; `frame` is the original at render size."""
        maps = []
        for unit, source in zip(self.units, self.sources):
            if source is None:
                image = frame.image
            else:
                rgb = source.image(frame.index)
                image = np.asarray(resize_plane(Image.fromarray(rgb), self.width, self.height, unit.resize))
            maps.append(control_map(image, unit.module, unit.threshold_a, unit.threshold_b, self.annotators, unit.processor_res))
        return tuple(maps)

    def close(self) -> None:
        """Stop the videos' decoders."""
        for source in self.sources:
            if source is not None:
                source.close()
