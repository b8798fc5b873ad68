"""Image files: finding the frames in a folder, reading one, writing one PNG safely.

Used for image-folder inputs and PNG-folder outputs here, and meant for any other folder of
pictures a run reads (masks, reference frames), so they all sort and decode alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlrt.errors import VlrtError

# Names with these suffixes are frames even if Pillow cannot read them: such a file is a
# corrupt frame to report, not a stray file to skip (skipping would shift every later frame).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".tga", ".ppm", ".pgm", ".pnm", ".pbm"}
)
_DIGITS = re.compile(r"([0-9]+)")
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: "frame2.png" before "frame10.png".

    Splitting on a capturing group alternates text and digits, so positions always compare
    like with like; the full name breaks ties such as "01" against "1".
    """
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name


def is_image_file(path: Path) -> bool:
    """True for a file named like an image, or whose content Pillow recognises as one."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, *_READ_ERRORS):
        return False


def list_images(folder: Path) -> list[Path]:
    """The image files of `folder` in natural order.

    Dotfiles and sub-folders are skipped; a file with an image suffix is taken as a frame,
    any other file only when Pillow recognises its content (so "0001" without a suffix
    counts and "prompts.txt" does not).
    """
    found = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        path = Path(entry.path)
        if is_image_file(path):
            found.append(path)
    return sorted(found, key=lambda p: natural_key(p.name))


def _to_arrays(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB uint8 and, when the picture has transparency, its alpha channel."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grey: keep the top 8 bits
        grey = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), None
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"))
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
    return np.array(image.convert("RGB")), None  # a writable copy: stages may edit frames in place


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode `path` to (RGB uint8 (H, W, 3), alpha uint8 (H, W) or None).

    EXIF orientation is applied, as every viewer does, so the frame looks as the user saw it.
    """
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
            return _to_arrays(image)
    except (UnidentifiedImageError, *_READ_ERRORS) as exc:
        why = "not a picture Pillow can decode" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise VlrtError(
            f"image '{path}' cannot be read ({why}): replace or remove that file, or re-export the frames"
        ) from exc


# Browsers show a GIF frame of 0–10 ms for 100 ms (many GIFs rely on it); so does vlrt, for every animation.
_SHORTEST_FRAME_MS = 10
_BROWSER_FRAME_MS = 100


def animation_durations(path: Path) -> list[float] | None:
    """Each frame's duration in seconds when `path` is an animated picture (GIF, APNG, WebP), else None."""
    try:
        with Image.open(path) as opened:
            if not getattr(opened, "is_animated", False) or opened.n_frames < 2:
                return None
            durations = []
            for number in range(opened.n_frames):
                opened.seek(number)
                opened.load()  # WebP sets a frame's duration only when it is decoded
                ms = opened.info.get("duration") or 0
                durations.append((ms if ms > _SHORTEST_FRAME_MS else _BROWSER_FRAME_MS) / 1000)
            return durations
    except (UnidentifiedImageError, *_READ_ERRORS):
        return None  # read_image says what is wrong with it


def animation_frames(path: Path, first: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The frames of an animated picture from number `first`, composed as shown; every frame has
    an alpha channel when the first one has, so the stream keeps one form."""
    try:
        with Image.open(path) as opened:
            opened.seek(0)
            keep_alpha = _to_arrays(opened)[1] is not None
            for number in range(first, opened.n_frames):
                opened.seek(number)
                yield _to_arrays(opened.convert("RGBA" if keep_alpha else "RGB"))
    except _READ_ERRORS as exc:
        raise VlrtError(f"animation '{path}' cannot be read ({exc}): re-export it, or convert it to a video") from exc


def write_png(path: Path, image: np.ndarray, alpha: np.ndarray | None = None) -> None:
    """Write an RGB (or RGBA, when `alpha` is given) PNG atomically.

    The picture goes to a hidden temporary name in the same folder and is renamed onto
    `path`, so a crash never leaves a truncated frame under a real frame name.
    """
    pixels = image if alpha is None else np.dstack([image, alpha])
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
