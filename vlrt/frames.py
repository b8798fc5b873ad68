"""The unit of data that flows between sources, stages and sinks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class Frame:
    """One picture of the video.

    `index` is the position in the (already subsampled) frame list, 0-based; schedules see
    `image_i = index + 1`. `image` is RGB uint8 of shape (H, W, 3). `alpha` is the input's
    alpha channel (H, W) uint8 when it had one; it is carried through untouched. `name` is the
    original file name for image-folder inputs (masks and prompt files are matched by it in every
    loop pass), else a generated one.
    """

    index: int
    image: np.ndarray
    alpha: np.ndarray | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def with_image(self, image: np.ndarray) -> Frame:
        """The same frame (index, name, alpha, meta) carrying another picture."""
        return replace(self, image=image)
