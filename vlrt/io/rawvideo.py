"""Raw rgb24 frames: W*H*3 bytes each, back to back, with no header.

The simplest pipe format: any program can produce or consume it, at the price of saying the
size (and rate) out of band.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from vlrt.errors import VlrtError
from vlrt.io.pipes import read_exactly

SIZE_HINT = "give --input-size WxH (and --input-fps R) matching what the producer writes"


def frame_bytes(size: tuple[int, int] | None, label: str) -> int:
    """Bytes per frame for `size` (W, H), or a `VlrtError` when the size is missing or absurd."""
    if size is None:
        raise VlrtError(f"raw video on {label} carries no frame size: {SIZE_HINT}")
    width, height = size
    if width <= 0 or height <= 0:
        raise VlrtError(f"raw video size {width}x{height} for {label} is not a picture size: {SIZE_HINT}")
    return width * height * 3


def raw_frames(stream: BinaryIO, size: tuple[int, int], label: str) -> Iterator[np.ndarray]:
    """Each frame as an RGB array; a frame cut short at the end of the stream is an error."""
    width, height = size
    need = frame_bytes(size, label)
    count = 0
    while True:
        data = read_exactly(stream, need)
        if not data:
            return
        if len(data) < need:
            raise VlrtError(
                f"raw video on {label} ended inside frame {count} ({len(data)} of {need} bytes): "
                f"the frame size is wrong; {SIZE_HINT}"
            )
        yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
        count += 1
