"""The prepare step between the source and the first loop pass (DESIGN.md §2).

Everything a frame needs in every loop pass is attached to it once, here, from the ORIGINAL
input frame, and travels with it in `Frame.meta` (`Frame.with_image` keeps meta):

- the picture at render size (`resize_mode`, alpha kept);
- "mask": the binary edit mask (255 = change), inverted with `inpainting_mask_invert`, when
  `use_mask` is on (so masks match the original frames in every pass, unlike the extension);
- "reference": the frame's picture in every reference folder, at render size, for the
  difference-mask temporal method (the original frame itself when no folder is given);
- "prompts": the (prompt, negative prompt) of `<frame>.txt`, with `read_prompt_from_txt`;
- "color_anchor": the colour distribution the SD results are matched to (`color_correction`);
- "shot": the first frame of the frame's shot (`scene_cuts`, `vlrt.image.scene_cuts`);
- "control": the frame's ControlNet control map of every unit (`vlrt.render.control_images`).

Prepared frames leave as tensors on the render device (picture and mask): from here to the sink
they stay there. The references and control maps stay on the host, where the difference masks are
made and the maps are cropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.image.color import FIRST, ORIGINAL, ColorAnchor
from vlrt.image.masks import MaskSource, invert_mask
from vlrt.image.resize import resize_frame, resize_plane
from vlrt.image.scene_cuts import ShotTracker
from vlrt.image.temporal_diff import DIFFERENCE_METHOD, reference_lists
from vlrt.io.images import read_image
from vlrt.io.sources import SourceInfo
from vlrt.render.control_images import ControlImages
from vlrt.settings.config import Settings
from vlrt.settings.prompt_files import read_prompt_file


class Preparer:
    """Prepares the frames of one input for one render at width×height."""

    def __init__(
        self, settings: Settings, info: SourceInfo, width: int, height: int, device: torch.device,
        cuts: Sequence[int] | None = None,
    ) -> None:
        """`cuts`: the scene cuts when already known (else `settings.scene_cuts` says: a list, or detect)."""
        self.settings, self.width, self.height, self.device = settings, width, height, device
        self.masks = None
        if settings.use_mask:
            step = 1 if settings.is_continue else settings.extract_nth_frame
            self.masks = MaskSource(
                settings.mask_directory, settings.mask_threshold, width, height, settings.resize_mode,
                settings.missing_mask, frame_step=step,
            )
        self.uses_references = settings.temporal_superimpose_method == DIFFERENCE_METHOD
        exact_count = info.frame_count if info.kind in ("folder", "image") else None
        self.reference_paths = reference_lists(
            settings.reference_frames_directory, settings.extract_nth_frame, settings.max_frames, exact_count
        ) if self.uses_references else []
        if settings.read_prompt_from_txt and info.kind != "folder":
            raise VlrtError(
                "read_prompt_from_txt needs an image-folder input (the prompt files sit beside the frames): "
                "extract the frames into a folder, or turn it off"
            )
        self.control = ControlImages(settings, exact_count, width, height, device) if settings.controlnet else None
        self.first_anchor: ColorAnchor | None = None
        self.shots = ShotTracker(settings.scene_cuts, settings.scene_cut_threshold, float(info.fps or 24), cuts)

    def scan(self, frames: Iterator[Frame]) -> list[int]:
        """The scene cuts of these frames (from frame 0), found without preparing them."""
        for frame in frames:
            self.shots.shot_of(frame.index, self._resized(frame).image)
        return list(self.shots.cuts)

    def frames(self, frames: Iterator[Frame], first: int = 0) -> Iterator[Frame]:
        """The prepared frames from index `first` on. Frames before are still seen: a shot's first frame
        anchors `first` colours, and cut detection follows the video from frame 0."""
        try:
            for frame in frames:
                resized = self._resized(frame)
                shot = self.shots.shot_of(frame.index, resized.image) if self.shots.active else 0
                if shot == frame.index and self.settings.color_correction == FIRST:  # frame 0, or a shot's first
                    self.first_anchor = ColorAnchor(torch.from_numpy(resized.image).to(self.device))
                if frame.index >= first:
                    yield self._prepared(resized, shot)
        finally:
            if self.control is not None:
                self.control.close()  # a control video's decoder

    def _prepared(self, frame: Frame, shot: int) -> Frame:
        meta = dict(frame.meta, shot=shot)
        if self.masks is not None:
            mask = self.masks.mask_for(frame)
            meta["mask"] = invert_mask(mask) if self.settings.inpainting_mask_invert else mask
        if self.uses_references:
            meta["reference"] = self._references(frame)
        if self.control is not None:
            meta["control"] = self.control(frame)
        if self.settings.read_prompt_from_txt:
            meta["prompts"] = read_prompt_file(meta["path"])
        frame = replace(frame, meta=meta).on_device(self.device)
        if self.settings.color_correction == ORIGINAL:
            frame.meta["color_anchor"] = ColorAnchor(frame.image)
        elif self.settings.color_correction == FIRST:
            frame.meta["color_anchor"] = self.first_anchor
        return frame

    def _resized(self, frame: Frame) -> Frame:
        return resize_frame(frame, self.width, self.height, self.settings.resize_mode)

    def _references(self, frame: Frame) -> tuple[np.ndarray, ...]:
        """The frame's picture in every reference folder (the frame itself when there is none)."""
        if not self.reference_paths:
            return (frame.image,)
        refs = []
        for paths in self.reference_paths:
            if frame.index >= len(paths):
                raise VlrtError(
                    f"reference folder '{Path(paths[0]).parent}' has {len(paths)} frames but the input has more "
                    f"(frame {frame.index + 1}): give a reference frame for every input frame"
                )
            rgb, _ = read_image(paths[frame.index])
            refs.append(np.asarray(resize_plane(Image.fromarray(rgb), self.width, self.height, self.settings.resize_mode)))
        return tuple(refs)
