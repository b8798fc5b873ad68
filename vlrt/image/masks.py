"""Inpainting masks: where each frame's mask comes from, and the WebUI's mask operations (SPEC.md §2.7).

255 means "change (inpaint) here", 0 means "keep". Masks are binarised with the user's threshold
(grey > threshold → 255) and, unlike the extension, stay binary when they must be resized, and are
matched to frames by the ORIGINAL input frame, in every loop pass (the extension matched loop 2 on
against its own 0-based output names and silently edited whole frames or used the previous frame's
mask).
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.image.resize import resize_plane
from vlrt.io.images import list_images, read_image

ERROR = "error"
KEEP = "keep"
MISSING_POLICIES = (ERROR, KEEP)
_NUMBER = re.compile(r"[0-9]+")


def binarise(grey: np.ndarray, threshold: int) -> np.ndarray:
    """255 where `grey > threshold` (strictly), else 0: the extension's mask threshold."""
    return np.where(grey > threshold, np.uint8(255), np.uint8(0))


def fit_mask(mask: np.ndarray, width: int, height: int, resize_mode: int) -> np.ndarray:
    """A binary mask resized to width×height with a frame resize mode's geometry, still binary.

    LANCZOS on the 0/255 mask, then a re-threshold at 127 (> 127 → 255): the edge lands where the
    resampled coverage crosses one half, so enlarged masks get smooth rather than blocky edges
    and shrunk ones keep each region where it covers about half a pixel or more. (The extension
    left LANCZOS's grey edges and ringing in the mask.)
    """
    if mask.shape == (height, width):
        return mask
    resized = resize_plane(Image.fromarray(mask), width, height, resize_mode, Image.Resampling.LANCZOS)
    return binarise(np.asarray(resized), 127)


class MaskSource:
    """The binary mask of each frame: from a folder, from one file, or from the frames' alpha.

    `mask_directory`:
      - a folder: each frame's mask is looked up in it, in this order:
        1. frames read from an image folder (those with `meta["path"]`): the mask with the
           frame's file name, else the one with the frame's file stem and another image suffix
           (`0042.jpg` finds `0042.png`);
        2. by position: frames of a video, a pipe or a single image (generated names), and
           image-folder frames that found no mask by name and whose stem is a number written with
           another digit count than every numbered mask (`0001.png` against `0000001.png`: a
           different numbering scheme). The mask folder's numbered masks (all-digit stems,
           compared by value) are 0-based when one of them is numbered 0, else 1-based (ffmpeg's
           `0000001.png`); the frame at position p (0-based `Frame.index`) of an input
           subsampled with `frame_step` (extract_nth_frame, or 1 with is_continue) is source frame
           p·frame_step and takes the mask numbered p·frame_step + base.
        Other frames find no mask: a non-numeric name, or a number in the masks' own digit count
        (then the folder names masks like the frames and simply lacks this one; a guess by
        position would hand the frame a neighbour's mask).
      - one image file: the same mask for every frame.
      - empty: each frame's own alpha channel (`Frame.alpha`).
    A frame with no mask raises a VlrtError naming it and the mask expected, unless
    `missing="keep"`, which gives an all-zero mask: the frame is kept unchanged, never edited
    whole. Masks of another size than width×height are resized with `fit_mask`.
    """

    def __init__(
        self, mask_directory: str, threshold: int, width: int, height: int, resize_mode: int,
        missing: str = ERROR, *, frame_step: int = 1,
    ) -> None:
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {MISSING_POLICIES}, not {missing!r}")
        self.threshold, self.width, self.height, self.resize_mode = threshold, width, height, resize_mode
        self.missing, self.frame_step = missing, frame_step
        self.folder: Path | None = None
        self._single: np.ndarray | None = None
        self._load = lru_cache(maxsize=8)(self._load_file)
        if not mask_directory.strip():
            return
        path = Path(mask_directory)
        if not path.exists():
            raise VlrtError(
                f"mask_directory '{path}' does not exist: give a folder of masks, one mask image, "
                "or leave it empty to use each frame's alpha channel"
            )
        if path.is_dir():
            self._index_folder(path)
        else:
            self._single = self._load(path)

    def _index_folder(self, folder: Path) -> None:
        files = list_images(folder)
        if not files:
            raise VlrtError(
                f"mask folder '{folder}' holds no images: put one mask per frame there (named like the frames)"
            )
        self.folder = folder
        self._by_name = {p.name: p for p in files}
        self._by_stem: dict[str, list[Path]] = defaultdict(list)
        self._by_number: dict[int, list[Path]] = defaultdict(list)
        for p in files:
            self._by_stem[p.stem].append(p)
            if _NUMBER.fullmatch(p.stem):
                self._by_number[int(p.stem)].append(p)
        self._base = 0 if 0 in self._by_number else 1
        numbered = [p for group in self._by_number.values() for p in group]
        self._number_widths = {len(p.stem) for p in numbered}
        self._number_format = (len(numbered[0].stem), numbered[0].suffix) if numbered else (7, ".png")

    def mask_for(self, frame: Frame) -> np.ndarray:
        """The frame's mask, uint8 (height, width) in {0, 255}; the frame must be at render size.

        Masks read from files are cached and returned read-only.
        """
        if (frame.width, frame.height) != (self.width, self.height):
            raise ValueError(f"frame {frame.name} is {frame.width}x{frame.height}, masks are {self.width}x{self.height}")
        if self._single is not None:
            return self._single
        if self.folder is None:
            return self._from_alpha(frame)
        path = self._find(frame)
        return self._missing(frame) if path is None else self._load(path)

    def _from_alpha(self, frame: Frame) -> np.ndarray:
        if frame.alpha is not None:
            return binarise(frame.alpha, self.threshold)
        if self.missing == KEEP:
            return self._zeros()
        raise VlrtError(
            f"frame '{frame.name}' has no alpha channel to use as its mask: give mask_directory "
            "(a folder of masks or one mask image), or use input frames with transparency"
        )

    def _find(self, frame: Frame) -> Path | None:
        if "path" in frame.meta:
            if frame.name in self._by_name:
                return self._by_name[frame.name]
            stem = Path(frame.name).stem
            if stem in self._by_stem:
                return self._unique(self._by_stem[stem], f"stem '{stem}'")
        if not self._by_position(frame):
            return None
        number = self._number(frame)
        return self._unique(self._by_number[number], f"number {number}") if number in self._by_number else None

    def _by_position(self, frame: Frame) -> bool:
        """Rule 2 of the class docstring: generated names, or numbers in another digit count than the masks'."""
        if "path" not in frame.meta:
            return True
        stem = Path(frame.name).stem
        return bool(_NUMBER.fullmatch(stem)) and len(stem) not in self._number_widths

    def _number(self, frame: Frame) -> int:
        return frame.index * self.frame_step + self._base

    def _unique(self, paths: list[Path], what: str) -> Path:
        if len(paths) > 1:
            names = ", ".join(f"'{p.name}'" for p in paths)
            raise VlrtError(f"mask folder '{self.folder}' has several masks with {what} ({names}): keep only one")
        return paths[0]

    def _missing(self, frame: Frame) -> np.ndarray:
        if self.missing == KEEP:
            return self._zeros()
        expected = [f"'{self.folder / frame.name}'"] if "path" in frame.meta else []
        if self._by_position(frame):
            width, suffix = self._number_format
            numbered = f"{self._number(frame):0{width}d}{suffix}"
            expected.append(f"'{self.folder / numbered}'")
        raise VlrtError(
            f"no mask for frame '{frame.name}' (frame {frame.index + 1}): expected {' or '.join(expected)}; "
            "add that mask, or let frames without a mask be kept unchanged (missing masks: keep)"
        )

    def _zeros(self) -> np.ndarray:
        return np.zeros((self.height, self.width), np.uint8)

    def _load_file(self, path: Path) -> np.ndarray:
        rgb, _ = read_image(path)
        grey = np.asarray(Image.fromarray(rgb).convert("L"))
        mask = fit_mask(binarise(grey, self.threshold), self.width, self.height, self.resize_mode)
        mask.flags.writeable = False
        return mask


def blur_mask(mask: np.ndarray, mask_blur: int) -> np.ndarray:
    """The WebUI's "mask blur": Pillow `GaussianBlur(radius=mask_blur)` on the 'L' mask (WebUI early 2023).

    It softens the seam where the inpainted result is pasted back; 0 leaves the mask as it is.
    (Later WebUIs blur x and y separately with OpenCV kernels; this is the 2023 behaviour.)
    """
    if mask_blur < 0:
        raise VlrtError(f"mask blur {mask_blur} is negative: give 0 (no blur) or a radius in pixels")
    if mask_blur == 0:
        return mask.copy()
    return np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(mask_blur)))


def invert_mask(mask: np.ndarray) -> np.ndarray:
    """255 − mask: the WebUI's "inpaint not masked" mode."""
    return 255 - mask


def composite(inside: torch.Tensor, outside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`inside` where mask is 255, `outside` where 0, proportional in between: Pillow `Image.composite`, exact.

    Pillow mixes each 8-bit channel as `(outside·(255−m) + inside·m) / 255` rounded to nearest;
    the integer form below is its exact division by 255. `mask` is (H, W), applied to every channel.
    Torch uint8 tensors on the render device (int32 arithmetic: the largest sum is 255·255 + 128).
    """
    m = mask.to(torch.int32)
    if inside.ndim == 3:
        m = m[..., None]
    mixed = outside.to(torch.int32) * (255 - m) + inside.to(torch.int32) * m + 128
    return ((mixed + (mixed >> 8)) >> 8).to(torch.uint8)


def crop_region(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The "inpaint only masked" region (x0, y0, x1, y1), right/bottom exclusive, for a width×height render.

    The rule: the bounding box of the mask's non-zero pixels, grown by `padding` on every side and
    clamped to the image; then its shorter side (relative to width:height) is grown to that aspect
    ratio, rounding up, centred (an odd surplus goes right/down), shifted back inside the image when it
    spills over an edge, and clamped to the image when the image is too small to hold it (the aspect is
    then not reached). An all-zero mask gives the whole image. The region is later scaled to
    width×height, inpainted, and pasted back, so matching the aspect avoids distorting it.
    """
    img_h, img_w = mask.shape[:2]
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return 0, 0, img_w, img_h
    x0, x1 = max(0, int(xs.min()) - padding), min(img_w, int(xs.max()) + 1 + padding)
    y0, y1 = max(0, int(ys.min()) - padding), min(img_h, int(ys.max()) + 1 + padding)
    w, h = x1 - x0, y1 - y0
    if w * height < width * h:
        x0, x1 = _grow(x0, x1, -(-h * width // height), img_w)
    elif w * height > width * h:
        y0, y1 = _grow(y0, y1, -(-w * height // width), img_h)
    return x0, y0, x1, y1


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """[lo, hi) widened to `size` around its centre, kept within [0, limit)."""
    size = min(size, limit)
    lo -= (size - (hi - lo)) // 2
    lo = min(max(lo, 0), limit - size)
    return lo, lo + size
