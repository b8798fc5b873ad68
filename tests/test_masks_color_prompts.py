"""Masks, colour correction, per-frame prompt files and the difference-mask temporal blend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageChops, ImageFilter

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.image.blend import FLOOR, ROUND
from vlrt.image.color import ColorAnchor, lab_to_rgb, match_histograms, rgb_to_lab
from vlrt.image.masks import MaskSource, blur_mask, composite, crop_region, invert_mask
from vlrt.image.resize import CROP_AND_RESIZE, JUST_RESIZE, RESIZE_AND_FILL
from vlrt.image.temporal_diff import diff_mask_blend, difference_mask, reference_lists
from vlrt.settings.prompt_files import frame_prompts, read_prompt_file

W, H = 8, 6
rng = np.random.default_rng(7)


def _distinct_mask(k: int) -> np.ndarray:
    """Mask number k: only column k is white, so every frame's mask is told apart."""
    mask = np.zeros((H, W), np.uint8)
    mask[:, k % W] = 255
    return mask


def _write_masks(folder: Path, numbers, pattern="{:07d}.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        Image.fromarray(_distinct_mask(n)).save(folder / pattern.format(n))
    return folder


def _video_frame(index: int, alpha: np.ndarray | None = None) -> Frame:
    """A frame with a generated name, as video, pipe and single-image inputs make."""
    return Frame(index, np.zeros((H, W, 3), np.uint8), alpha, f"{index:06d}.png", {})


def _folder_frame(index: int, name: str, folder: Path = Path("/in")) -> Frame:
    """A frame read from an image folder: it keeps its file name and path."""
    return Frame(index, np.zeros((H, W, 3), np.uint8), None, name, {"path": folder / name})


def _source(mask_dir, **kw) -> MaskSource:
    return MaskSource(str(mask_dir), 127, W, H, JUST_RESIZE, **kw)


# --- mask sources ---


def test_mask_folder_one_based_matches_original_names_and_positions(tmp_path):
    masks = _write_masks(tmp_path / "m", [1, 2, 3])  # ffmpeg numbering
    source = _source(masks)
    for i in range(3):  # by the original file name, whatever loop pass the caller is in
        assert np.array_equal(source.mask_for(_folder_frame(i, f"{i + 1:07d}.png")), _distinct_mask(i + 1))
    for i in range(3):  # generated names: frame position p takes mask p + 1
        assert np.array_equal(source.mask_for(_video_frame(i)), _distinct_mask(i + 1))
    for i in range(3):  # numbered frames with other padding fall back on their position
        assert np.array_equal(source.mask_for(_folder_frame(i, f"{i + 1:04d}.png")), _distinct_mask(i + 1))


def test_mask_folder_zero_based_and_other_suffix(tmp_path):
    masks = _write_masks(tmp_path / "m", [0, 1, 2])
    source = _source(masks)
    for i in range(3):
        assert np.array_equal(source.mask_for(_video_frame(i)), _distinct_mask(i))
        assert np.array_equal(source.mask_for(_folder_frame(i, f"{i:07d}.jpg")), _distinct_mask(i))


def test_mask_folder_named_frames_and_subsampled_positions(tmp_path):
    named = tmp_path / "named"
    named.mkdir()
    for k, name in enumerate(["shot_a", "shot_b"]):
        Image.fromarray(_distinct_mask(k + 4)).save(named / f"{name}.png")
    source = _source(named)
    assert np.array_equal(source.mask_for(_folder_frame(0, "shot_a.png")), _distinct_mask(4))
    assert np.array_equal(source.mask_for(_folder_frame(1, "shot_b.png")), _distinct_mask(5))
    with pytest.raises(VlrtError, match="shot_c.png"):  # no guessing by position for named frames
        source.mask_for(_folder_frame(2, "shot_c.png"))

    stepped = _source(_write_masks(tmp_path / "all", range(1, 7)), frame_step=2)
    for i, expected in enumerate([1, 3, 5]):  # every 2nd source frame, 1-based masks
        assert np.array_equal(stepped.mask_for(_video_frame(i)), _distinct_mask(expected))


def test_named_frames_zero_based_against_one_based_masks(tmp_path):
    source = _source(_write_masks(tmp_path / "m", [1, 2, 3]))
    for i in range(3):  # 0000.png.. (0-based, 4 digits) against ffmpeg's 0000001.png..: by position
        assert np.array_equal(source.mask_for(_folder_frame(i, f"{i:04d}.png")), _distinct_mask(i + 1))


def test_a_mask_missing_from_a_same_named_folder_is_not_taken_from_a_neighbour(tmp_path):
    masks = _write_masks(tmp_path / "m", [5, 6, 7])  # masks for some frames only, named like them
    source = _source(masks, missing="keep")
    assert not source.mask_for(_folder_frame(4, "0000004.png")).any()  # position would give mask 5
    assert np.array_equal(source.mask_for(_folder_frame(5, "0000005.png")), _distinct_mask(5))
    with pytest.raises(VlrtError) as err:
        _source(masks).mask_for(_folder_frame(4, "0000004.png"))
    assert f"expected '{masks / '0000004.png'}';" in str(err.value)


def test_two_masks_for_one_frame_is_an_error(tmp_path):
    masks = _write_masks(tmp_path / "m", [1])
    Image.fromarray(_distinct_mask(2)).save(masks / "0000001.jpg")
    with pytest.raises(VlrtError, match="several masks"):
        _source(masks).mask_for(_video_frame(0))
    assert np.array_equal(_source(masks).mask_for(_folder_frame(0, "0000001.png")), _distinct_mask(1))


def test_missing_mask_errors_with_frame_and_path_or_keeps_the_frame(tmp_path):
    masks = _write_masks(tmp_path / "m", [1, 2])
    with pytest.raises(VlrtError) as err:
        _source(masks).mask_for(_folder_frame(2, "0000003.png"))
    assert "0000003.png" in str(err.value) and str(masks / "0000003.png") in str(err.value)
    with pytest.raises(VlrtError, match="0000003.png"):
        _source(masks).mask_for(_video_frame(2))
    kept = _source(masks, missing="keep").mask_for(_video_frame(2))
    assert kept.shape == (H, W) and not kept.any()


def test_nonexistent_or_empty_mask_directory(tmp_path):
    with pytest.raises(VlrtError, match="does not exist"):
        _source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlrtError, match="no images"):
        _source(tmp_path / "empty")


def test_single_mask_file_for_every_frame(tmp_path):
    Image.fromarray(_distinct_mask(3)).save(tmp_path / "mask.png")
    source = _source(tmp_path / "mask.png")
    for i in range(3):
        assert np.array_equal(source.mask_for(_video_frame(i)), _distinct_mask(3))


def test_alpha_channel_mask_and_frames_without_alpha(tmp_path):
    alpha = np.array([[0, 127, 128, 255] * 2] * H, np.uint8)
    source = _source("")
    assert np.array_equal(source.mask_for(_video_frame(0, alpha)), np.where(alpha > 127, 255, 0))
    with pytest.raises(VlrtError, match="000001.png"):
        source.mask_for(_video_frame(1))
    assert not _source("", missing="keep").mask_for(_video_frame(1)).any()


def test_threshold_is_strictly_greater(tmp_path):
    grey = np.full((H, W), 100, np.uint8)
    grey[:, 4:] = 101
    Image.fromarray(grey).save(tmp_path / "g.png")
    mask = MaskSource(str(tmp_path / "g.png"), 100, W, H, JUST_RESIZE).mask_for(_video_frame(0))
    assert not mask[:, :4].any() and (mask[:, 4:] == 255).all()


def test_colour_mask_is_thresholded_on_its_luma(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)  # luma 76: kept at threshold 127
    rgb[:, 4:] = (0, 255, 0)  # luma 150: inpainted
    Image.fromarray(rgb).save(tmp_path / "c.png")
    mask = _source(tmp_path / "c.png").mask_for(_video_frame(0))
    assert not mask[:, :4].any() and (mask[:, 4:] == 255).all()


@pytest.mark.parametrize("mode", [JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL])
@pytest.mark.parametrize("size", [(32, 24), (5, 7), (16, 4)])
def test_wrong_size_mask_is_resized_and_stays_binary(tmp_path, mode, size):
    big = np.zeros((size[1], size[0]), np.uint8)
    big[:, size[0] // 2:] = 200  # right half inpainted
    Image.fromarray(big).save(tmp_path / "m.png")
    mask = MaskSource(str(tmp_path / "m.png"), 127, W, H, mode).mask_for(_video_frame(0))
    assert mask.shape == (H, W)
    assert set(np.unique(mask)) <= {0, 255}
    assert (mask[:, W - 1] == 255).all() and not mask[:, 0].any()


def test_mask_of_wrong_frame_size_is_a_caller_bug(tmp_path):
    with pytest.raises(ValueError):
        _source("").mask_for(Frame(0, np.zeros((H + 1, W, 3), np.uint8), np.zeros((H + 1, W), np.uint8)))


# --- mask operations ---


def _t(*images):
    """Compositing, colour matching and blends take uint8 tensors (frames live on the render device)."""
    return [torch.from_numpy(i) for i in images]


@pytest.mark.parametrize("channels", [3, 0])
def test_composite_is_pillow_composite_bit_for_bit(channels):
    shape = (31, 45, channels) if channels else (31, 45)
    inside, outside = rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)
    mask = rng.integers(0, 256, (31, 45), dtype=np.uint8)
    mask[0, :6] = [0, 255, 1, 254, 127, 128]
    expected = Image.composite(Image.fromarray(inside), Image.fromarray(outside), Image.fromarray(mask))
    assert np.array_equal(composite(*_t(inside, outside, mask)).numpy(), np.asarray(expected))


def test_composite_extremes_and_invert():
    a, b = np.full((2, 2, 3), 200, np.uint8), np.full((2, 2, 3), 10, np.uint8)
    mask = np.array([[0, 255], [255, 0]], np.uint8)
    out = composite(*_t(a, b, mask)).numpy()
    assert (out[0, 1] == 200).all() and (out[0, 0] == 10).all()
    assert np.array_equal(composite(*_t(a, b, invert_mask(mask))).numpy(), composite(*_t(b, a, mask)).numpy())


@pytest.mark.parametrize("radius", [1, 4, 9])
def test_blur_mask_is_pillow_gaussian_blur(radius):
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 15:35] = 255
    expected = Image.fromarray(mask).filter(ImageFilter.GaussianBlur(radius))
    assert np.array_equal(blur_mask(mask, radius), np.asarray(expected))
    assert np.array_equal(blur_mask(mask, 0), mask)
    with pytest.raises(VlrtError):
        blur_mask(mask, -1)


def _block(x0, y0, x1, y1, w=100, h=100):
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


@pytest.mark.parametrize(
    ("mask", "padding", "target", "expected"),
    [
        (_block(40, 40, 50, 60), 0, (512, 512), (35, 40, 55, 60)),  # widened to square, centred
        (_block(40, 40, 50, 60), 4, (512, 512), (31, 36, 59, 64)),  # padding first, then aspect
        (_block(40, 40, 60, 50), 0, (512, 512), (40, 35, 60, 55)),  # taller
        (_block(40, 40, 50, 60), 0, (768, 512), (30, 40, 60, 60)),  # 3:2 target: 20 high → 30 wide
        (_block(40, 40, 50, 61), 0, (512, 512), (35, 40, 56, 61)),  # odd surplus goes right
        (_block(0, 0, 10, 20), 8, (512, 512), (0, 0, 28, 28)),  # clamped at the corner, shifted inside
        (_block(95, 90, 100, 100), 3, (512, 512), (87, 87, 100, 100)),  # far corner
        (_block(0, 10, 100, 40, 100, 50), 0, (512, 512), (0, 0, 100, 50)),  # image too small for the aspect
        (np.zeros((30, 40), np.uint8), 5, (512, 512), (0, 0, 40, 30)),  # empty mask: whole image
        (_block(40, 40, 50, 60), 0, (10, 20), (40, 40, 50, 60)),  # already the aspect
    ],
)
def test_crop_region(mask, padding, target, expected):
    assert crop_region(mask, padding, *target) == expected


# --- colour ---


def _textured(h=48, w=64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([60 + 1.5 * x, 70 + 2 * y, 150 - x - y / 2], axis=-1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def test_lab_round_trip_is_exact():
    rgb = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    assert np.array_equal(lab_to_rgb(rgb_to_lab(torch.from_numpy(rgb))).numpy(), rgb)
    assert np.allclose(rgb_to_lab(torch.tensor([255, 255, 255], dtype=torch.uint8)).numpy(), [100, 0, 0], atol=1e-6)


def test_histogram_matching_removes_a_colour_cast():
    reference = _textured()
    cast = np.clip(reference.astype(int) + [30, -12, 20], 0, 255).astype(np.uint8)
    fixed = match_histograms(*_t(cast, reference)).numpy()
    before = np.abs(cast.mean(axis=(0, 1)) - reference.mean(axis=(0, 1)))
    after = np.abs(fixed.mean(axis=(0, 1)) - reference.mean(axis=(0, 1)))
    assert (after <= 0.2 * before).all(), (before, after)
    assert fixed.dtype == np.uint8 and fixed.shape == cast.shape


def test_color_anchor_is_built_once_and_matches_like_match_histograms():
    anchor_picture = np.clip(_textured().astype(int) + [40, 0, 0], 0, 255).astype(np.uint8)
    anchor = ColorAnchor(torch.from_numpy(anchor_picture))
    for shift in ([0, 40, 0], [0, 0, -30]):
        output = np.clip(_textured().astype(int) + shift, 0, 255).astype(np.uint8)
        assert np.array_equal(anchor.match(torch.from_numpy(output)).numpy(), match_histograms(*_t(output, anchor_picture)).numpy())


# --- prompt files ---


def test_prompt_file_parsing(tmp_path):
    frame = tmp_path / "0001.png"
    assert read_prompt_file(frame) == (None, None)
    (tmp_path / "0001.txt").write_text("ein Mädchen, 猫, smile  --neg blurry --neg, low quality\n", encoding="utf-8")
    assert read_prompt_file(frame) == ("ein Mädchen, 猫, smile", "blurry --neg, low quality")
    (tmp_path / "a.b.txt").write_text("\ufeffonly a prompt\n\n", encoding="utf-8")
    assert read_prompt_file(tmp_path / "a.b.jpg") == ("only a prompt", None)
    (tmp_path / "neg.txt").write_text(" --neg  bad hands ", encoding="utf-8")
    assert read_prompt_file(tmp_path / "neg.png") == (None, "bad hands")
    (tmp_path / "tight.txt").write_text("a--neg b", encoding="utf-8")  # no spaces: not a separator
    assert read_prompt_file(tmp_path / "tight.png") == ("a--neg b", None)
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    assert read_prompt_file(tmp_path / "empty.png") == (None, None)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(VlrtError, match="UTF-8"):
        read_prompt_file(tmp_path / "latin.png")


@pytest.mark.parametrize(
    ("file", "resolved", "expected"),
    [
        (("txt p", "txt n"), ("sch p", "sch n"), ("txt p", "txt n")),  # the txt overrides schedules
        ((None, None), ("sch p", "sch n"), ("sch p", "sch n")),
        (("txt p", None), ("sch p", "sch n"), ("txt p", "sch n")),  # each part on its own
        ((None, "txt n"), ("ui p", "ui n"), ("ui p", "txt n")),
    ],
)
def test_prompt_precedence(file, resolved, expected):
    assert frame_prompts(file, resolved) == expected


# --- difference-mask temporal blend ---


def _pillow_diff_blend(frames, refs, weights, current):
    """The method as SPEC §2.5 describes it, step by step in Pillow (floor mode)."""
    now, ref_now = Image.fromarray(frames[current]), Image.fromarray(refs[current])
    acc = None
    for k, (frame, ref, a) in enumerate(zip(frames, refs, weights), start=1):
        diff = ImageChops.difference(ref_now, Image.fromarray(ref)).convert("L")
        mask = diff.point(lambda x: 255 if x > 0 else 255 * (1 - a))  # noqa: B023 (used at once)
        mixed = Image.composite(now, Image.fromarray(frame), mask)
        acc = mixed if acc is None else Image.blend(acc, mixed, 1.0 / k)
    return np.asarray(acc)


@pytest.mark.parametrize("weights", [[0.3, 1.0, 0.3], [0.03, 0.95, 0.02], [0.5, 0.2, 1.0, 0.7, 0.1]])
def test_diff_mask_blend_matches_pillow(weights):
    n = len(weights)
    frames = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(n)]
    base = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    refs = []
    for _ in range(n):  # mostly static references with a few changed pixels, some too faint to show in luma
        ref = base.copy()
        ref[rng.integers(0, 20, 40), rng.integers(0, 30, 40)] ^= np.uint8(8)
        ref[rng.integers(0, 20, 40), rng.integers(0, 30, 40), 0] ^= np.uint8(1)
        refs.append(ref)
    current = n // 2
    expected = _pillow_diff_blend(frames, refs, weights, current).astype(int)
    assert np.abs(diff_mask_blend(_t(*frames), [(r,) for r in refs], weights, current, FLOOR).numpy().astype(int) - expected).max() <= 2
    assert np.abs(diff_mask_blend(_t(*frames), [(r,) for r in refs], weights, current, ROUND).numpy().astype(int) - expected).max() <= 2


def test_diff_mask_static_reference_mixes_neighbours_moving_keeps_current():
    frames = [np.full((4, 6, 3), v, np.uint8) for v in (0, 90, 210)]
    static = [(np.full((4, 6, 3), 50, np.uint8),)] * 3
    mixed = diff_mask_blend(_t(*frames), static, [1.0, 1.0, 1.0], 1, ROUND).numpy()
    assert (mixed == 100).all()  # (0 + 90 + 210) / 3: the neighbours fully used where nothing moved
    moving = [static[0][0].copy(), static[0][0].copy(), static[0][0].copy()]
    moving[0][:, :3] = 200
    moving[2][:, :3] = 0  # the left half moves in the reference
    out = diff_mask_blend(_t(*frames), [(m,) for m in moving], [1.0, 1.0, 1.0], 1, ROUND).numpy()
    assert (out[:, :3] == 90).all() and (out[:, 3:] == 100).all()
    # Two reference folders: a pixel moving in either one keeps the current frame there.
    other = [static[0][0].copy() for _ in range(3)]
    other[0][:2] = 99  # the top rows of slot 0 move in the second reference only: (90 + 90 + 210) / 3
    both = diff_mask_blend(_t(*frames), [(m, o) for m, o in zip(moving, other)], [1.0, 1.0, 1.0], 1, ROUND).numpy()
    assert (both[:, :3] == 90).all() and (both[:2, 3:] == 130).all() and (both[2:, 3:] == 100).all()
    half = diff_mask_blend(_t(*frames), static, [0.5, 0.0, 0.5], 1, ROUND).numpy()
    assert (half == 95).all()  # (45 + 90 + 150) / 3: each weight says how much neighbour to take


def test_difference_mask_values():
    a = np.zeros((1, 3, 3), np.uint8)
    b = a.copy()
    b[0, 1] = (1, 0, 0)  # luma rounds to 0: counts as static, as in Pillow
    b[0, 2] = (0, 3, 0)
    assert difference_mask(a, b, 0.3).tolist() == [[178, 178, 255]]
    assert difference_mask(a, b, 1.5).tolist() == [[0, 0, 255]]  # clipped
    grey = Image.fromarray(np.array([[0, 1]], np.uint8))
    for w in (0.5, 0.1, 0.9, 1 / 3, 0.998, 128.5 / 255):  # the static value is Pillow's point() rounding
        expected = np.asarray(grey.point(lambda x: 255 if x > 0 else 255 * (1 - w)))[0, 0]  # noqa: B023 (used at once)
        assert difference_mask(a, a, w)[0, 0] == expected, w


def _frames_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((2, 2, 3), i, np.uint8)).save(folder / f"f{i + 1}.png")
    return folder


def test_reference_lists_parsing(tmp_path):
    a, b = _frames_folder(tmp_path / "a", 12), _frames_folder(tmp_path / "b c", 6)
    lists = reference_lists(f" {a} !!! {b}  !!!", 2, 4, 3)
    assert [[p.name for p in lst] for lst in lists] == [["f1.png", "f3.png", "f5.png", "f7.png"], ["f1.png", "f3.png", "f5.png"]]
    assert reference_lists("", 1, None, 5) == [] and reference_lists(" !!! ", 1, None, 5) == []
    assert len(reference_lists(str(a), 1, None, None)[0]) == 12


def test_reference_lists_errors(tmp_path):
    a = _frames_folder(tmp_path / "a", 5)
    with pytest.raises(VlrtError) as err:
        reference_lists(f"{a}!!!{a}", 2, None, 4)
    assert str(a) in str(err.value) and "3 frames" in str(err.value) and "has 4" in str(err.value)
    with pytest.raises(VlrtError, match="not a folder"):
        reference_lists(f"{a} !!! {a / 'f1.png'}", 1, None, 5)
    with pytest.raises(VlrtError, match="not a folder"):
        reference_lists(str(tmp_path / "missing"), 1, None, 5)
