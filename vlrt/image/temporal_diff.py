"""The "with difference mask from reference" temporal blend, and its reference frame lists (SPEC.md §2.5, §2.1 step 11).

Neighbouring frames bleed into the init image only where a reference video (the original, a pose
video, ...) did not change between them and the current frame, which limits ghosting on moving
parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops

from vlrt.errors import VlrtError
from vlrt.image.blend import FLOOR, mean, quantise
from vlrt.image.masks import composite
from vlrt.io.images import list_images

REFERENCE_SEPARATOR = "!!!"
DIFFERENCE_METHOD = "with difference mask from reference"


def difference_mask(ref_current: np.ndarray, ref_other: np.ndarray, weight: float) -> np.ndarray:
    """255 where the reference changed (any grey-level difference), round(255·(1−weight)) where it did not.

    The difference is taken per channel and made grey with Pillow's `convert('L')` (ITU-R 601
    luma, rounded), so a change that rounds to grey 0 counts as static, as in the extension. The
    static value is rounded half to even and clipped to 0–255, as Pillow's `point` does. The
    extension then resized this mask with LANCZOS to the frame size; the references here are
    already at render size, so that step is a no-op and is left out.
    """
    if ref_current.shape != ref_other.shape:
        raise ValueError(f"reference frames differ in size: {ref_current.shape} and {ref_other.shape}")
    diff = ImageChops.difference(Image.fromarray(ref_current), Image.fromarray(ref_other))
    grey = np.asarray(diff.convert("L"))
    static = np.uint8(np.clip(np.rint(255.0 * (1.0 - weight)), 0, 255))
    return np.where(grey > 0, np.uint8(255), static)


def diff_mask_blend(
    frames: Sequence[torch.Tensor],
    refs: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    current: int,
    rounding: str,
) -> torch.Tensor:
    """The init image: the mean over window slots j of `composite(current frame, frames[j], mask_j)`.

    `frames` (uint8 tensors on the render device), `refs` and `weights` are the window's slots in
    temporal order (neighbours past the video's ends already dropped), all at render size;
    `refs[j]` holds slot j's frame of every reference folder (host arrays: they come from files),
    and a pixel counts as moving when any reference changed there (with one folder, the
    extension's rule). `current` is the current frame's slot. The masks are made on the host
    (Pillow's grey conversion), the blend on the frames' device.
    Weights are not normalised: each is "how much of that neighbour to use where the reference is
    static", and the current slot always gives the current frame. In floor mode the composites are
    Pillow's (rounded) and averaged with the extension's running Pillow blend; in round mode each
    composite is kept in float and the exact mean is rounded once.
    """
    if not len(frames) == len(refs) == len(weights):
        raise ValueError(f"{len(frames)} frames, {len(refs)} references and {len(weights)} weights")
    now = frames[current]
    masks = [
        torch.from_numpy(
            np.maximum.reduce([difference_mask(cur, other, w) for cur, other in zip(refs[current], slot, strict=True)])
        ).to(now.device)
        for slot, w in zip(refs, weights)
    ]
    if rounding == FLOOR:
        return mean([composite(now, img, m) for img, m in zip(frames, masks)], FLOOR)
    now32 = now.float()
    total = torch.zeros(now.shape, dtype=torch.float32, device=now.device)
    for img, m in zip(frames, masks):
        t = (m.float() / 255.0)[..., None]
        total += img.float() + t * (now32 - img.float())
    return quantise(total / len(frames), rounding)


def reference_lists(spec: str, extract_nth_frame: int, max_frames: int | None, n_frames: int | None) -> list[list[Path]]:
    """The frame files of each reference folder in `reference_frames_directory`; [] when it is empty.

    Folders are separated by "!!!"; spaces around each are stripped (the extension broke on
    "/a !!! /b") and empty parts dropped. Each folder is listed in natural order and subsampled like
    the input, `[::extract_nth_frame][:max_frames]` (even with is_continue, as in the extension).
    A folder with fewer frames than the input's `n_frames` is an error rather than the extension's
    silent reuse of its last frame; later extra frames are unused. `n_frames=None` (an input of
    unknown length) skips that check.
    """
    lists = []
    for part in (p.strip() for p in spec.split(REFERENCE_SEPARATOR)):
        if not part:
            continue
        folder = Path(part)
        if not folder.is_dir():
            raise VlrtError(
                f"reference frames '{part}' is not a folder: give folders of frames separated by '{REFERENCE_SEPARATOR}'"
            )
        frames = list_images(folder)[::extract_nth_frame][:max_frames]
        if not frames:
            raise VlrtError(f"reference folder '{folder}' holds no images: put one reference frame per input frame there")
        if n_frames is not None and len(frames) < n_frames:
            raise VlrtError(
                f"reference folder '{folder}' has {len(frames)} frames (after extract_nth_frame/max_frames) "
                f"but the input has {n_frames}: give a reference frame for every input frame"
            )
        lists.append(frames)
    return lists
