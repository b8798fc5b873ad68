"""The unit of data that flows between sources, stages and sinks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class Frame:
    """One picture of the video.

    `index` is the position in the (already subsampled) frame list, 0-based; schedules see
    `image_i = index + 1`. `image` is RGB uint8 of shape (H, W, 3): a numpy array at the edges
    (sources, sinks, files) and a torch tensor on the render device between the stages of a render
    (`on_device` at the end of prepare, `on_host` before the sink), so frames do not leave the
    device between loop passes; `meta["mask"]` moves with it. `alpha` is the input's
    alpha channel (H, W) uint8 when it had one; it is carried through untouched. `name` is the
    original file name for image-folder inputs (masks and prompt files are matched by it in every
    loop pass), else a generated one.
    """

    index: int
    image: np.ndarray | torch.Tensor
    alpha: np.ndarray | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def with_image(self, image: np.ndarray | torch.Tensor) -> Frame:
        """The same frame (index, name, alpha, meta) carrying another picture."""
        return replace(self, image=image)

    def on_device(self, device: torch.device) -> Frame:
        """This frame with its picture (and mask) as tensors on `device`."""
        meta = dict(self.meta)
        if "mask" in meta:
            meta["mask"] = picture_tensor(meta["mask"], device)
        return replace(self, image=picture_tensor(self.image, device), meta=meta)

    def on_host(self) -> Frame:
        """This frame with its picture (and mask) as numpy arrays, for sinks and files."""
        if isinstance(self.image, np.ndarray):
            return self
        meta = dict(self.meta)
        if isinstance(meta.get("mask"), torch.Tensor):
            meta["mask"] = meta["mask"].cpu().numpy()
        return replace(self, image=self.image.cpu().numpy(), meta=meta)


def picture_tensor(picture: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A picture as a tensor on `device`; a read-only array (a decoder's) is copied, as torch cannot share it."""
    if isinstance(picture, np.ndarray) and not picture.flags.writeable:
        picture = picture.copy()
    return torch.as_tensor(picture).to(device)
