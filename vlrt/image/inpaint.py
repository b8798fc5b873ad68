"""Inpainting around one img2img call, with the WebUI inpaint tab's semantics (SPEC.md §1.3, §5).

For a frame whose edit mask (255 = change) is given:
1. The mask is blurred (`mask_blur`, a Gaussian radius) to soften the seam.
2. "Whole picture" (`inpaint_full_res` off): SD sees the whole init image; the result is pasted
   back through the blurred mask doubled (`min(2·m, 255)`), so the inside of the mask is fully SD's.
   "Only masked" (`inpaint_full_res` on): the region around the mask (`inpaint_full_res_padding`
   pixels of context, grown to the frame's aspect ratio) is cut out and scaled to width×height
   with "resize and fill", so SD spends all its pixels on it; the result is scaled back, put in
   place, and pasted back through the blurred mask.
3. What SD starts from inside the mask (`inpainting_fill`): `original` (the init image),
   `fill` (the masked area painted with the colours around it, blurred from far to near),
   `latent noise` (the sample's own noise instead of the encoded picture) or `latent nothing`
   (zeros).
4. The latent mask (the mask SD sees, at latent resolution, rounded to 0/1) keeps the unmasked
   latents on the init image's noising trajectory at every step (diffusers' way for ordinary,
   4-channel UNets); see `vlrt.executor.jobs`. An inpainting model (9-channel UNet) is given the
   mask at the picture's size, rounded to 0/1, instead: it shrinks it and blanks the masked image itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from vlrt.frames import picture_tensor
from vlrt.image.masks import blur_mask, composite, crop_region
from vlrt.image.resize import CROP_AND_RESIZE, RESIZE_AND_FILL, resize_plane

FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = "fill", "original", "latent noise", "latent nothing"
FILLS = (FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING)
# The fill's blur passes, far to near: (Gaussian radius, how many times the blurred layer is laid on).
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


@dataclass(frozen=True)
class InpaintOptions:
    """The WebUI's inpainting settings (names of its HTTP API)."""

    mask_blur: int
    inpainting_fill: str
    inpaint_full_res: bool
    inpaint_full_res_padding: int


@dataclass(frozen=True)
class InpaintPlan:
    """What SD is given for one frame, and how its result is put back into the frame."""

    sd_image: np.ndarray  # (H, W, 3): the picture SD starts from
    latent_mask: np.ndarray  # (H/scale, W/scale) float32 in {0, 1}: 1 where SD may change latents
    pixel_mask: np.ndarray  # (H, W) float32 in {0, 1}: the same at the picture's size, an inpainting model's input
    init: np.ndarray  # the init image the result is pasted over
    overlay: np.ndarray  # (H, W) uint8: how much of SD's result each pixel takes when pasted back
    region: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) of "only masked", else None

    def sd_view(self, image: np.ndarray) -> np.ndarray:
        """Another (H, W, 3) picture of the frame (a ControlNet map) cropped and scaled as `sd_image` was."""
        return image if self.region is None else _crop_scaled(image, self.region)

    def paste_back(self, result: torch.Tensor) -> torch.Tensor:
        """SD's (H, W, 3) result (a tensor on the render device) put back over the init image through
        the blurred mask; "only masked" scales the result back with Pillow, a round trip to the host."""
        device = result.device
        if self.region is not None:
            x0, y0, x1, y1 = self.region
            patch = resize_plane(Image.fromarray(result.cpu().numpy()), x1 - x0, y1 - y0, CROP_AND_RESIZE)
            placed = self.init.copy()
            placed[y0:y1, x0:x1] = np.asarray(patch)
            result = picture_tensor(placed, device)
        return composite(result, picture_tensor(self.init, device), picture_tensor(self.overlay, device))


def plan_inpaint(init: np.ndarray, edit_mask: np.ndarray, options: InpaintOptions, latent_scale: int) -> InpaintPlan:
    """The SD input and paste-back for `init` (H, W, 3) and its binary `edit_mask` (H, W).

    Host arrays: the blur, crop and fill are Pillow's, so a masked frame's plan is made on the host."""
    height, width = edit_mask.shape
    blurred = blur_mask(edit_mask, options.mask_blur)
    region = None
    if options.inpaint_full_res:
        region = crop_region(blurred, options.inpaint_full_res_padding, width, height)
        sd_image, sd_mask = _crop_scaled(init, region), _crop_scaled(blurred, region)
        overlay = blurred
    else:
        sd_image, sd_mask = init, blurred
        overlay = np.minimum(blurred.astype(np.uint16) * 2, 255).astype(np.uint8)
    if options.inpainting_fill == FILL:
        sd_image = fill_masked(sd_image, sd_mask)
    pixel_mask = np.rint(sd_mask.astype(np.float32) / 255.0)
    return InpaintPlan(sd_image, latent_mask(sd_mask, latent_scale), pixel_mask, init, overlay, region)


def _crop_scaled(image: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """The region of `image` scaled to the image's own size ("only masked")."""
    x0, y0, x1, y1 = region
    height, width = image.shape[:2]
    return np.asarray(resize_plane(Image.fromarray(image[y0:y1, x0:x1]), width, height, RESIZE_AND_FILL))


def latent_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    """The mask at latent resolution (bicubic), rounded to 0/1, as the WebUI makes it."""
    height, width = mask.shape
    small = Image.fromarray(mask).resize((width // scale, height // scale), Image.Resampling.BICUBIC)
    return np.rint(np.asarray(small, np.float32) / 255.0).astype(np.float32)


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`image` with the masked area (mask 255) painted in the colours that surround it.

    The unmasked pixels, weighted by how unmasked they are, are blurred with decreasing radii; each
    blurred layer (colour divided by its blurred weight) is laid over the previous ones by its
    blurred weight, so far-away colours fill the middle of a hole and near ones its edges. Outside
    the mask the last, unblurred layer restores the picture.
    """
    keep = Image.fromarray(255 - mask)
    weighted = Image.new("RGBa", keep.size)
    weighted.paste(Image.fromarray(image).convert("RGBa"), mask=keep)
    canvas = Image.new("RGBA", keep.size)
    for radius, repeats in _FILL_PASSES:
        layer = weighted.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            canvas.alpha_composite(layer)
    return np.asarray(canvas.convert("RGB"))

