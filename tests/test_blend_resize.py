"""Image maths against Pillow's own arithmetic, and the resize modes' geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlrt.frames import Frame
from vlrt.image import blend
from vlrt.image.resize import CROP_AND_RESIZE, JUST_RESIZE, RESIZE_AND_FILL, resize_frame

rng = np.random.default_rng(0)


def _t(*images):
    """The blends take uint8 tensors (frames live on the render device)."""
    return [torch.from_numpy(i) for i in images]


def _img(h=17, w=23):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("t", [0.0, 0.01, 0.25, 1 / 3, 0.5, 0.77, 1.0, 1.5, -0.3])
def test_floor_blend_is_pillow_blend_bit_for_bit(t):
    a, b = _img(), _img()
    expected = np.asarray(Image.blend(Image.fromarray(a), Image.fromarray(b), t))
    assert np.array_equal(blend.blend(*_t(a, b), t, blend.FLOOR).numpy(), expected)


def test_round_blend_rounds_instead_of_truncating():
    a = np.full((1, 1, 3), 10, np.uint8)
    b = np.full((1, 1, 3), 13, np.uint8)
    assert blend.blend(*_t(a, b), 0.5, blend.FLOOR)[0, 0, 0] == 11  # 11.5 truncated
    assert blend.blend(*_t(a, b), 0.5, blend.ROUND)[0, 0, 0] == 12  # 11.5 to even


def test_mean_floor_is_the_extensions_running_blend_and_round_is_exact():
    images = [_img() for _ in range(5)]
    acc = Image.fromarray(images[0])
    for k in range(2, 6):
        acc = Image.blend(acc, Image.fromarray(images[k - 1]), 1.0 / k)
    assert np.array_equal(blend.mean(_t(*images), blend.FLOOR).numpy(), np.asarray(acc))
    exact = np.rint(np.mean(np.stack(images).astype(np.float64), axis=0))
    assert np.abs(blend.mean(_t(*images), blend.ROUND).numpy().astype(int) - exact).max() <= 1


def test_temporal_simple_matches_the_spec_running_mean_and_keeps_current_on_zero_weights():
    frames = [_img() for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    acc, total = Image.fromarray(frames[0]), 0.0
    for w, f in zip(weights, frames):
        total += w
        acc = Image.blend(acc, Image.fromarray(f), w / total)
    assert np.array_equal(blend.temporal_simple(_t(*frames), weights, 1, blend.FLOOR).numpy(), np.asarray(acc))
    weighted = sum(w * f.astype(np.float64) for w, f in zip(weights, frames)) / sum(weights)
    assert np.abs(blend.temporal_simple(_t(*frames), weights, 1).numpy().astype(int) - np.rint(weighted)).max() <= 1
    # The extension returned the oldest frame for all-zero weights; vlrt keeps the current one.
    for rounding in (blend.FLOOR, blend.ROUND):
        assert np.array_equal(blend.temporal_simple(_t(*frames), [0, 0, 0], 1, rounding).numpy(), frames[1])


def _corner_frame(w=40, h=20, alpha=True):
    image = np.zeros((h, w, 3), np.uint8)
    image[: h // 2, : w // 2] = (255, 0, 0)
    image[: h // 2, w // 2 :] = (0, 255, 0)
    image[h // 2 :, : w // 2] = (0, 0, 255)
    image[h // 2 :, w // 2 :] = (255, 255, 0)
    a = np.zeros((h, w), np.uint8)
    a[:, w // 2 :] = 255
    return Frame(0, image, a if alpha else None, "x.png")


def test_just_resize_keeps_every_corner_and_alpha():
    out = resize_frame(_corner_frame(), 20, 20, JUST_RESIZE)
    assert out.image.shape == (20, 20, 3) and out.alpha.shape == (20, 20)
    assert tuple(out.image[1, 1]) == (255, 0, 0) and tuple(out.image[-2, -2]) == (255, 255, 0)
    assert out.alpha[10, 1] == 0 and out.alpha[10, -2] == 255


def test_crop_and_resize_crops_the_sides_of_a_wide_frame():
    out = resize_frame(_corner_frame(w=80, h=20), 20, 20, CROP_AND_RESIZE)
    assert out.image.shape == (20, 20, 3)
    # A 4:1 frame cropped to 1:1 keeps only the middle: red|green on top, blue|yellow below, alpha 0|255.
    assert tuple(out.image[2, 2]) == (255, 0, 0) and tuple(out.image[2, -3]) == (0, 255, 0)
    assert tuple(out.image[-3, 2]) == (0, 0, 255) and tuple(out.image[-3, -3]) == (255, 255, 0)
    assert out.alpha[10, 2] == 0 and out.alpha[10, -3] == 255


def test_resize_and_fill_letterboxes_with_stretched_edges():
    out = resize_frame(_corner_frame(w=40, h=10), 20, 20, RESIZE_AND_FILL)
    assert out.image.shape == (20, 20, 3)
    # The 4:1 picture fits in the middle 5 rows; the rows above repeat its top edge, below its bottom
    # (within LANCZOS ringing of a 5-row picture).
    def near(pixel, colour):
        return np.abs(pixel.astype(int) - np.array(colour)).max() <= 12

    assert near(out.image[0, 2], (255, 0, 0)) and near(out.image[0, -3], (0, 255, 0))
    assert near(out.image[-1, 2], (0, 0, 255)) and near(out.image[-1, -3], (255, 255, 0))
    assert near(out.image[0, 10], out.image[7, 10]) and near(out.image[19, 10], out.image[12, 10])
    assert out.alpha[0, 2] <= 12 and out.alpha[-1, -3] >= 243
