"""vlrt's frames against diffusers' own pipeline and an independent plain-loop implementation of SPEC §2.2–§2.5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_frames, reference_scheduler
from PIL import Image
from tiny_sd import load_pipeline

from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

PROMPT, NEGATIVE = "a watercolour fox", "blurry"


def _pipeline(model_dir, sampler: str):
    pipe = load_pipeline(model_dir)
    pipe.scheduler = reference_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd(pipe, image: Image.Image, seed: int, steps: int, strength: float, cfg: float, f: int = 0) -> Image.Image:
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=image,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "LMS Karras"])  # ancestral noise; multistep state; scipy
@pytest.mark.parametrize("which", ["demo", "tiny8"])
def test_single_pass_equals_diffusers_img2img(which, sampler, request, clip_folder, tmp_path):
    """loop_n=1, α=1, batch 1, no temporal blend, fixed seed: each frame is diffusers' img2img of that frame."""
    model = request.getfixturevalue(f"{which}_model")
    steps, strength, cfg, seed = 8, 0.6, 6.5, 1234
    settings = build_settings(
        overrides=dict(
            model=str(model.path), backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name=sampler, steps=steps,
            denoising_strength=strength, cfg_scale=cfg, seed=seed, prompt=PROMPT, negative_prompt=NEGATIVE,
        )
    )
    render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=model)
    pipe = _pipeline(model.path, sampler)
    inputs = read_frames(clip_folder)
    outputs = read_frames(tmp_path / "out")
    assert len(outputs) == len(inputs)
    assert model.vae_scale_factor == (2 if which == "demo" else 8)
    for frame_in, frame_out in zip(inputs, outputs):
        expected = np.asarray(_sd(pipe, Image.fromarray(frame_in), seed, steps, strength, cfg))
        assert np.abs(frame_out.astype(int) - expected.astype(int)).max() <= 2
    # The test must be able to fail: the frames differ from each other and from the inputs
    # (a random VAE, as in the tiny8 model, decodes different frames only slightly differently).
    assert np.abs(outputs[0].astype(int) - outputs[3].astype(int)).mean() > 0.5
    assert np.abs(outputs[0].astype(int) - inputs[0].astype(int)).mean() > 2


def reference_loopback(frames, pipe, *, loop_n, alpha, weights, batch, seed, steps, strength, cfg, sd=_sd):
    """SPEC §2.2–§2.5 as plain loops over the whole video, with Pillow's own blends (the extension's arithmetic).
    `sd(pipe, image, seed, steps, strength, cfg, f)` is one SD call on frame f's init image."""
    h = len(weights) // 2
    current = [Image.fromarray(f) for f in frames]
    n = len(current)
    for loop in range(loop_n):
        out = []
        for f in range(n):
            window = [j for j in range(f - h, f + h + 1) if 0 <= j < n]
            acc, total = current[window[0]], 0.0
            for j in window:
                w = weights[h + j - f]
                total += w
                if total <= 0:
                    continue
                acc = Image.blend(acc, current[j], w / total)
            # vlrt's documented seed rule without fix_seed: seed + (f·loop_n + L)·samples + k
            samples = [
                sd(pipe, acc, seed + (f * loop_n + loop) * batch + k, steps, strength, cfg, f) for k in range(batch)
            ]
            mean = samples[0]
            for k in range(2, batch + 1):
                mean = Image.blend(mean, samples[k - 1], 1.0 / k)
            out.append(Image.blend(current[f], mean, alpha))
        current = out
    return [np.asarray(img) for img in current]


def test_loopback_equals_plain_reference(demo_model, clip_folder, tmp_path):
    """Several passes, α<1, a 3-tap temporal list and batch 2, streamed and batched, equal the plain loops."""
    params = dict(loop_n=3, alpha=0.4, weights=[0.25, 0.5, 0.25], batch=2, seed=77, steps=6, strength=0.5, cfg=5.0)
    settings = build_settings(
        overrides=dict(
            model="demo", backend="torch", loop_n=params["loop_n"], superimpose_alpha=params["alpha"],
            temporal_superimpose_alpha_list="0.25,0.5,0.25", batch_size=params["batch"], fix_seed=False,
            seed=params["seed"], steps=params["steps"], denoising_strength=params["strength"], cfg_scale=params["cfg"],
            prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name="Euler a", blend_rounding="floor", max_batch=16,
        )
    )
    result = render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=demo_model)
    got = read_frames(tmp_path / "out")
    expected = reference_loopback(read_frames(clip_folder), _pipeline(demo_model.path, "Euler a"), **params)
    assert len(got) == len(expected) == 6
    for g, e in zip(got, expected):
        assert np.abs(g.astype(int) - e.astype(int)).max() <= 3
    # Batching really happened: fewer UNet calls than UNet rows evaluated one by one.
    rows = 6 * params["loop_n"] * params["batch"] * 2 * int(params["steps"] * params["strength"])
    assert result.engine_calls["unet"] < rows / 4


def test_floor_rounding_truncates_the_decoded_image_as_the_webui_does(demo_model, clip_folder, tmp_path):
    """The WebUI turns the decoded image into 8 bits with `astype(uint8)` (truncation), diffusers rounds:
    with blend_rounding = floor a single pass (α 1) is diffusers' float picture truncated."""
    steps, strength, cfg, seed = 4, 0.6, 6.5, 99
    frames = {}
    for rounding in ("round", "floor"):
        settings = build_settings(overrides=dict(
            model="demo", backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name="Euler a", steps=steps,
            denoising_strength=strength, cfg_scale=cfg, seed=seed, prompt=PROMPT, negative_prompt=NEGATIVE,
            blend_rounding=rounding,
        ))
        render(settings, str(clip_folder), f"{tmp_path / rounding}/", quiet=True, model=demo_model)
        frames[rounding] = read_frames(tmp_path / rounding)
    pipe = _pipeline(demo_model.path, "Euler a")
    first = read_frames(clip_folder)[0]
    decoded = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(first), strength=strength,
                   num_inference_steps=steps, guidance_scale=cfg, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    truncated = (decoded * 255).astype(np.uint8)
    got = frames["floor"][0].astype(int)
    assert np.abs(got - truncated).max() <= 1 and np.mean(got == truncated) > 0.95
    # Truncation takes half a level off on average: the two modes must differ by that much.
    lower = np.mean(frames["round"][0].astype(int) - got)
    assert 0.3 < lower < 0.7
