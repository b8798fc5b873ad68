"""ControlNet units: vlrt's frames against diffusers' StableDiffusionControlNetImg2ImgPipeline, settings and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_frames, write_frames
from controlnet_fixtures import controlnet_pipeline, make_tiny_controlnet
from PIL import Image

from vlrt.demo.clip import sample_frames
from vlrt.model.samplers import SAMPLERS
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

PROMPT, NEGATIVE = "a watercolour fox", "blurry"


@pytest.fixture(scope="module")
def controlnet_dirs(demo_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    return [make_tiny_controlnet(demo_model, folder / f"cn{i}", seed=i) for i in range(2)]


def _scheduler(model, sampler: str):
    cls, overrides = SAMPLERS[sampler]
    return cls.from_config(model.scheduler_config, **overrides)


def _settings(**overrides):
    base = dict(
        model="demo", backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name="Euler a", steps=8,
        denoising_strength=0.6, cfg_scale=6.0, seed=4321, prompt=PROMPT, negative_prompt=NEGATIVE,
    )
    return build_settings(overrides={**base, **overrides})


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_one_unit_equals_diffusers_controlnet_img2img(demo_model, controlnet_dirs, clip_folder, tmp_path):
    """One unit, module none, the input frame as control, a guidance range that switches it off for the last step."""
    unit = f"model={controlnet_dirs[0]},weight=0.8,guidance_start=0.0,guidance_end=0.7"
    settings = _settings(controlnet=[unit])
    render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=demo_model)
    plain = _settings()
    render(plain, str(clip_folder), str(tmp_path / "plain") + "/", quiet=True, model=demo_model)
    pipe = controlnet_pipeline(demo_model, controlnet_dirs[:1], _scheduler(demo_model, "Euler a"))
    inputs, outputs, without = read_frames(clip_folder), read_frames(tmp_path / "out"), read_frames(tmp_path / "plain")
    assert len(outputs) == len(inputs) == 6
    for frame_in, frame_out in zip(inputs, outputs):
        expected = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(frame_in), control_image=Image.fromarray(frame_in),
            strength=0.6, num_inference_steps=8, guidance_scale=6.0, controlnet_conditioning_scale=0.8,
            control_guidance_start=0.0, control_guidance_end=0.7, generator=torch.Generator("cpu").manual_seed(4321),
        ).images[0]
        assert _max_diff(frame_out, np.asarray(expected)) <= 2
    # The ControlNet measurably changes the frames (the comparison above could fail).
    assert np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(outputs, without)]) > 2


def test_two_units_from_reference_folders_equal_multicontrolnet(demo_model, controlnet_dirs, clip_folder, tmp_path):
    """Two units, each fed by its own `!!!` part of reference_frames_directory, against MultiControlNetModel."""
    refs = [sample_frames(9, (64, 48))[3:], [255 - f for f in sample_frames(6, (64, 48))]]
    folders = [write_frames(tmp_path / f"ref{i}", r) for i, r in enumerate(refs)]
    units = [f"model={controlnet_dirs[0]},weight=0.7", f"model={controlnet_dirs[1]},weight=1.2,guidance_start=0.3"]
    settings = _settings(controlnet=units, reference_frames_directory="!!!".join(map(str, folders)))
    render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=demo_model)
    pipe = controlnet_pipeline(demo_model, controlnet_dirs, _scheduler(demo_model, "Euler a"))
    inputs, outputs = read_frames(clip_folder), read_frames(tmp_path / "out")
    for k, (frame_in, frame_out) in enumerate(zip(inputs, outputs)):
        expected = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(frame_in),
            control_image=[Image.fromarray(refs[0][k]), Image.fromarray(refs[1][k])],
            strength=0.6, num_inference_steps=8, guidance_scale=6.0, controlnet_conditioning_scale=[0.7, 1.2],
            control_guidance_start=[0.0, 0.3], control_guidance_end=[1.0, 1.0],
            generator=torch.Generator("cpu").manual_seed(4321),
        ).images[0]
        assert _max_diff(frame_out, np.asarray(expected)) <= 2
