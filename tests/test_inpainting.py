"""Masks, inpainting, reference frames, per-frame prompts and colour correction in whole renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_frames, reference_scheduler, write_frames
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image, ImageChops

from vlrt.cli import main
from vlrt.demo.clip import sample_frames
from vlrt.errors import VlrtError
from vlrt.image.color import ColorAnchor
from vlrt.image.inpaint import InpaintOptions, fill_masked, latent_mask, plan_inpaint
from vlrt.image.resize import RESIZE_AND_FILL, resize_plane
from vlrt.io.sources import open_source
from vlrt.render.pipeline import render
from vlrt.render.prepare import Preparer
from vlrt.settings.config import build_settings

W, H = 64, 48
FAST = dict(model="demo", backend="torch", steps=4, denoising_strength=0.5, cfg_scale=5.0, seed=5, prompt="a fox",
            negative_prompt="blurry", sampler_name="Euler a")


def _mask_file(path: Path, left: bool = True) -> Path:
    """White (edit) on the left half, or on the right half."""
    mask = np.zeros((H, W), np.uint8)
    mask[:, : W // 2] = 255
    Image.fromarray(mask if left else 255 - mask).save(path)
    return path


def _render(inputs: Path, out: Path, model, **overrides):
    settings = build_settings(overrides={**FAST, **overrides})
    return render(settings, str(inputs), str(out) + "/", quiet=True, model=model)


def _changed(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# --- the inpainting step against diffusers' own inpainting pipeline ---


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras"])
def test_masked_pass_equals_diffusers_inpaint_pipeline(sampler, demo_model, clip_folder, tmp_path):
    """loop_n 1, α 1, no blur, 'original' fill: inside the mask each frame is diffusers' inpainting of it
    (an ordinary 4-channel UNet: unmasked latents follow the init image's noising), outside it is the input."""
    steps, strength, cfg, seed = 8, 0.6, 6.0, 99
    mask_path = _mask_file(tmp_path / "mask.png")
    _render(clip_folder, tmp_path / "out", demo_model, loop_n=1, superimpose_alpha=1.0, use_mask=True,
            mask_directory=str(mask_path), mask_blur=0, sampler_name=sampler, steps=steps, denoising_strength=strength,
            cfg_scale=cfg, seed=seed)
    m = demo_model
    pipe = StableDiffusionInpaintPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
        scheduler=reference_scheduler(sampler, m.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    mask = np.asarray(Image.open(mask_path))
    # diffusers shrinks the mask to latent size by nearest neighbour; vlrt as the WebUI does: the same here.
    assert np.array_equal(latent_mask(mask, m.vae_scale_factor), (mask[::2, ::2] > 127).astype(np.float32))
    inside = mask == 255
    for frame_in, frame_out in zip(read_frames(clip_folder), read_frames(tmp_path / "out")):
        want = np.asarray(pipe(
            prompt=FAST["prompt"], negative_prompt=FAST["negative_prompt"], image=Image.fromarray(frame_in),
            mask_image=Image.fromarray(mask), strength=strength, num_inference_steps=steps, guidance_scale=cfg,
            generator=torch.Generator("cpu").manual_seed(seed), height=H, width=W,
        ).images[0])
        assert np.abs(frame_out[inside].astype(int) - want[inside].astype(int)).max() <= 2
        assert np.array_equal(frame_out[~inside], frame_in[~inside])
        assert _changed(frame_out[inside], frame_in[inside]) > 2


# --- outside the mask nothing changes ---


@pytest.mark.parametrize(
    ("options", "outside_changes"),
    [
        (dict(inpainting_fill="fill"), False),
        (dict(inpaint_full_res=True, inpainting_fill="latent noise", inpaint_full_res_padding=8), False),
        (dict(inpainting_mask_invert=True, inpainting_fill="latent nothing", invert_file=True), False),
        (dict(post_process_outside_mask=True), True),  # the extension's whole-frame post-processing
    ],
    ids=["fill", "only-masked", "inverted", "whole-frame-post"],
)
def test_a_mask_keeping_the_right_half_keeps_it_exactly(options, outside_changes, demo_model, clip_folder, tmp_path):
    options = dict(options)
    mask_path = _mask_file(tmp_path / "mask.png", left=not options.pop("invert_file", False))
    _render(
        clip_folder, tmp_path / "out", demo_model, loop_n=3, superimpose_alpha=0.6, use_mask=True,
        mask_directory=str(mask_path), temporal_superimpose_alpha_list="0.2,0.6,0.2",
        image_post_processing_schedule="lambda img: img.filter(ImageFilter.BLUR) if loop_i != 2 else img",
        video_post_process_method="fastdvdnet", **options,
    )
    inputs, outputs = read_frames(clip_folder), read_frames(tmp_path / "out")
    assert len(outputs) == len(inputs) == 6
    for frame_in, frame_out in zip(inputs, outputs):
        right_in, right_out = frame_in[:, W // 2 :], frame_out[:, W // 2 :]
        assert np.array_equal(right_out, right_in) != outside_changes
        assert _changed(frame_out[:, : W // 2], frame_in[:, : W // 2]) > 2  # the left half was really edited


# --- each frame its own mask, in every pass ---


def _band_masks(folder: Path, count: int) -> list[np.ndarray]:
    """Mask of frame k (1-based file k): only the vertical band of columns 8(k-1) … 8k-1 is edited."""
    masks = []
    for k in range(count):
        mask = np.zeros((H, W), np.uint8)
        mask[:, 8 * k : 8 * k + 8] = 255
        masks.append(mask)
    write_frames(folder, masks, "{:07d}.png")
    return masks


def test_mask_folder_matches_every_pass_by_the_original_frame(demo_model, tmp_path):
    """ffmpeg-numbered frames and masks (0000001.png …): the extension looked up 0000000.png … from pass 2 on."""
    frames = write_frames(tmp_path / "in", sample_frames(6, (W, H)), "{:07d}.png")
    masks = _band_masks(tmp_path / "masks", 6)
    _render(frames, tmp_path / "out", demo_model, loop_n=3, superimpose_alpha=0.8, use_mask=True,
            mask_directory=str(tmp_path / "masks"), mask_blur=2, fix_seed=False)
    for frame_in, frame_out, mask in zip(read_frames(frames), read_frames(tmp_path / "out"), masks):
        edit = mask == 255
        assert np.array_equal(frame_out[~edit], frame_in[~edit])  # no pass used another frame's mask
        assert _changed(frame_out[edit], frame_in[edit]) > 2


def test_missing_mask_is_an_error_naming_the_frame_or_keeps_that_frame(demo_model, tmp_path, capsys):
    frames = write_frames(tmp_path / "in", sample_frames(4, (W, H)), "{:07d}.png")
    masks = _band_masks(tmp_path / "masks", 4)
    (tmp_path / "masks" / "0000003.png").unlink()
    args = ["render", str(frames), "-o", str(tmp_path / "out.mp4"), "--model", "demo", "--backend", "torch",
            "--use-mask", "--mask-directory", str(tmp_path / "masks"), "--steps", "2", "--loop-n", "2", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no mask for frame '0000003.png'" in err and "missing masks: keep" in err
    assert not (tmp_path / "out.mp4").exists()
    _render(frames, tmp_path / "kept", demo_model, loop_n=2, superimpose_alpha=0.8, use_mask=True,
            mask_directory=str(tmp_path / "masks"), missing_mask="keep")
    for k, (frame_in, frame_out) in enumerate(zip(read_frames(frames), read_frames(tmp_path / "kept"))):
        if k == 2:
            assert np.array_equal(frame_out, frame_in)  # left unchanged, never edited whole
        else:
            assert _changed(frame_out[masks[k] == 255], frame_in[masks[k] == 255]) > 2


def test_a_mask_of_another_size_is_resized(demo_model, clip_folder, tmp_path):
    big = np.zeros((H * 3, W * 3), np.uint8)
    big[:, : W * 3 // 2] = 255
    Image.fromarray(big).save(tmp_path / "big.png")
    _render(clip_folder, tmp_path / "out", demo_model, loop_n=1, superimpose_alpha=1.0, use_mask=True,
            mask_directory=str(tmp_path / "big.png"))
    for frame_in, frame_out in zip(read_frames(clip_folder), read_frames(tmp_path / "out")):
        assert np.array_equal(frame_out[:, W // 2 :], frame_in[:, W // 2 :])


# --- the inpainting plan ---


def test_whole_picture_and_only_masked_plans():
    rng = np.random.default_rng(1)
    init = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    mask[10:20, 30:40] = 255
    whole = plan_inpaint(init, mask, InpaintOptions(0, "original", False, 0), 2)
    assert whole.sd_image is init and whole.region is None and whole.latent_mask.shape == (H // 2, W // 2)
    result = torch.full(init.shape, 7, dtype=torch.uint8)  # SD's result, on the render device
    pasted = whole.paste_back(result).numpy()
    assert (pasted[mask == 255] == 7).all() and np.array_equal(pasted[mask == 0], init[mask == 0])

    only = plan_inpaint(init, mask, InpaintOptions(0, "original", True, 4), 2)
    # The mask's box (30…39, 10…19) grown by the padding to 26…43 × 6…23, then widened to the frame's 4:3.
    assert only.region == (23, 6, 47, 24)
    x0, y0, x1, y1 = only.region
    expected = np.asarray(resize_plane(Image.fromarray(init[y0:y1, x0:x1]), W, H, RESIZE_AND_FILL))
    assert np.array_equal(only.sd_image, expected)  # SD sees the region scaled to the full frame
    pasted = only.paste_back(result).numpy()
    assert (pasted[mask == 255] == 7).all() and np.array_equal(pasted[mask == 0], init[mask == 0])
    assert only.latent_mask.mean() > whole.latent_mask.mean()  # the region fills more of SD's frame

    blurred = plan_inpaint(init, mask, InpaintOptions(3, "original", False, 0), 2)
    ring = blurred.overlay[(mask == 0)]
    assert ring.max() > 0 and blurred.overlay.max() == 255  # the seam is soft; the inside is all SD's


def test_fill_paints_the_hole_in_the_surrounding_colour():
    image = np.zeros((H, W, 3), np.uint8)
    image[:, : W // 2] = (200, 30, 30)
    image[:, W // 2 :] = (20, 40, 220)
    image[16:32, 8:24] = (255, 255, 255)  # the part to be inpainted, inside the red half
    mask = np.zeros((H, W), np.uint8)
    mask[16:32, 8:24] = 255
    filled = fill_masked(image, mask)
    assert np.array_equal(filled[mask == 0], image[mask == 0])
    hole = filled[20:28, 12:20].reshape(-1, 3).mean(axis=0)
    assert hole[0] > 150 and hole[1] < 80 and hole[2] < 110, hole  # red from around it, not white


# --- the prepare step ---


def test_prepare_attaches_inverted_masks_and_anchors_first_colours_to_frame_zero(tmp_path):
    frames = write_frames(tmp_path / "in", sample_frames(4, (W, H)))
    mask_path = _mask_file(tmp_path / "mask.png")
    settings = build_settings(overrides=dict(model="demo", use_mask=True, mask_directory=str(mask_path),
                                             inpainting_mask_invert=True, color_correction="first"))
    with open_source(str(frames)) as source:
        prepare = Preparer(settings, source.info, W, H, torch.device("cpu"))
        prepared = list(prepare.frames(iter(source), first=2))  # as when resuming at frame 2
    assert [f.index for f in prepared] == [2, 3]
    assert all(isinstance(f.image, torch.Tensor) for f in prepared)  # prepared frames live on the render device
    assert (prepared[0].meta["mask"][:, : W // 2] == 0).all() and (prepared[0].meta["mask"][:, W // 2 :] == 255).all()
    frame0 = read_frames(frames)[0]
    probe = read_frames(frames)[3]
    for f in prepared:
        probe_t = torch.from_numpy(probe)
        assert torch.equal(f.meta["color_anchor"].match(probe_t), ColorAnchor(torch.from_numpy(frame0)).match(probe_t))


def test_prompt_files_need_an_image_folder(tmp_path):
    settings = build_settings(overrides=dict(model="demo", read_prompt_from_txt=True, max_frames=2))
    Image.fromarray(sample_frames(1, (W, H))[0]).save(tmp_path / "one.png")
    with open_source(str(tmp_path / "one.png"), max_frames=2) as source, pytest.raises(VlrtError, match="image-folder"):
        Preparer(settings, source.info, W, H, torch.device("cpu"))


def test_per_frame_prompt_files_set_each_frames_prompt(demo_model, tmp_path):
    frames = write_frames(tmp_path / "in", sample_frames(3, (W, H)))
    (tmp_path / "in" / "0001.txt").write_text("a red fox --neg grey", encoding="utf-8")
    (tmp_path / "in" / "0002.txt").write_text("a blue whale\n", encoding="utf-8")  # negative from the run
    one_pass = dict(loop_n=1, superimpose_alpha=1.0, prompt_schedule="'a green frog' if image_i == 3 else 'unused'")
    _render(frames, tmp_path / "txt", demo_model, read_prompt_from_txt=True, **one_pass)
    got = read_frames(tmp_path / "txt")
    for k, (prompt, negative) in enumerate([("a red fox", "grey"), ("a blue whale", "blurry"), ("a green frog", "blurry")]):
        _render(frames, tmp_path / f"p{k}", demo_model, **{**one_pass, "prompt_schedule": repr(prompt)},
                negative_prompt=negative)
        assert np.array_equal(got[k], read_frames(tmp_path / f"p{k}")[k]), k
    assert not np.array_equal(got[0], read_frames(tmp_path / "p1")[0])  # the prompt really matters


# --- reference frames and the difference-mask method ---


def _pillow_diff_init(frames, refs, weights, f):
    """SPEC §2.5's difference-mask init image for frame f, written out in Pillow (truncated window)."""
    h, n = len(weights) // 2, len(frames)
    now, ref_now = Image.fromarray(frames[f]), Image.fromarray(refs[f])
    acc = None
    window = [j for j in range(f - h, f + h + 1) if 0 <= j < n]
    for k, j in enumerate(window, start=1):
        a = weights[h + j - f]
        diff = ImageChops.difference(ref_now, Image.fromarray(refs[j])).convert("L")
        mask = diff.point(lambda x: 255 if x > 0 else round(255 * (1 - a)))  # noqa: B023 (used at once)
        mixed = Image.composite(now, Image.fromarray(frames[j]), mask)
        acc = mixed if acc is None else Image.blend(acc, mixed, 1.0 / k)
    return acc


def test_difference_mask_loopback_equals_plain_reference(demo_model, tmp_path):
    """Each of two passes with the difference-mask method equals SPEC §2.2–§2.5 written out with Pillow,
    given the same pass input (so SD's own ±2 does not compound across passes)."""
    from test_render_exactness import _pipeline, _sd

    frames = sample_frames(5, (W, H))
    refs = [f.copy() for f in frames]
    for r in refs:
        r[: H // 2] = 90  # the top half of the reference never moves: neighbours bleed in there only
    inputs = write_frames(tmp_path / "in", frames)
    write_frames(tmp_path / "ref", refs)
    weights, alpha, steps, strength, cfg, seed = [0.3, 1.0, 0.3], 0.5, 6, 0.5, 5.0, 11
    _render(inputs, tmp_path / "out", demo_model, loop_n=2, superimpose_alpha=alpha, steps=steps,
            denoising_strength=strength, cfg_scale=cfg, seed=seed, temporal_superimpose_alpha_list="0.3,1,0.3",
            temporal_superimpose_method="with difference mask from reference", save_every_loop=True,
            reference_frames_directory=f" {tmp_path / 'ref'} ", blend_rounding="floor", sampler_name="Euler a")
    pipe = _pipeline(demo_model.path, "Euler a")
    passes = [read_frames(inputs), read_frames(tmp_path / "out-loop_1"), read_frames(tmp_path / "out")]
    for before, after in zip(passes, passes[1:]):
        for f, got in enumerate(after):
            init = _pillow_diff_init(before, refs, weights, f)
            want = Image.blend(Image.fromarray(before[f]), _sd(pipe, init, seed, steps, strength, cfg), alpha)
            assert np.abs(got.astype(int) - np.asarray(want).astype(int)).max() <= 2


def test_too_few_reference_frames_is_an_error(clip_folder, tmp_path, capsys):
    write_frames(tmp_path / "ref", sample_frames(4, (W, H)))  # the clip has 6
    args = ["render", str(clip_folder), "-o", str(tmp_path / "out") + "/", "--model", "demo", "--quiet",
            "--temporal-superimpose-method", "with difference mask from reference",
            "--reference-frames-directory", str(tmp_path / "ref")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has 4 frames" in err and "the input has 6" in err
    assert not any((tmp_path / "out").glob("*.png"))


# --- colour correction ---


def test_color_correction_original_holds_the_colours_that_none_lets_drift(demo_model, clip_folder, tmp_path):
    """The demo model tints what it paints; over passes the tint compounds unless matched to each original."""
    inputs = read_frames(clip_folder)

    def drift(mode: str) -> float:
        _render(clip_folder, tmp_path / mode, demo_model, loop_n=4, superimpose_alpha=0.7, color_correction=mode)
        outputs = read_frames(tmp_path / mode)
        return float(np.mean([np.abs(o.mean(axis=(0, 1)) - i.mean(axis=(0, 1))).mean() for o, i in zip(outputs, inputs)]))

    none, original = drift("none"), drift("original")
    assert none > 3 and original < 0.5 * none, (none, original)


def test_mask_threshold_is_the_grey_level_above_which_pixels_are_masked(demo_model, clip_folder, tmp_path):
    grey = np.zeros((H, W), np.uint8)
    grey[:, : W // 2] = 110  # masked under --mask-threshold 100, not under the default 127
    Image.fromarray(grey).save(tmp_path / "grey.png")
    for threshold, edited in ((100, True), (127, False)):
        _render(clip_folder, tmp_path / f"t{threshold}", demo_model, loop_n=1, superimpose_alpha=1.0, use_mask=True,
                mask_directory=str(tmp_path / "grey.png"), mask_threshold=threshold)
        frame_in, frame_out = read_frames(clip_folder)[0], read_frames(tmp_path / f"t{threshold}")[0]
        assert (_changed(frame_out[:, : W // 2], frame_in[:, : W // 2]) > 2) == edited
        assert np.array_equal(frame_out[:, W // 2 :], frame_in[:, W // 2 :])
