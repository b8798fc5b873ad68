"""Inpainting models (9-channel UNets: latents, mask, masked-image latents) against diffusers' own
`StableDiffusionInpaintPipeline`, which runs such a UNet without putting the unmasked latents back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import read_frames, reference_scheduler
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from original_layout import to_original
from PIL import Image
from safetensors.torch import save_file
from tiny_sd import make_tiny_sd
from tiny_sdxl import make_tiny_sdxl

from vlrt.cli import main
from vlrt.errors import VlrtError
from vlrt.model.loading import ModelOptions, load_model
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

CPU = torch.device("cpu")
W, H = 64, 48
RUN = dict(backend="torch", steps=8, denoising_strength=0.6, cfg_scale=6.0, seed=99, prompt="a fox",
           negative_prompt="blurry", loop_n=1, superimpose_alpha=1.0, mask_blur=0)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory) -> Path:
    """A tiny SD 1.x-like inpainting model (the demo's trained VAE, scale factor 2; random UNet taking 9 channels)
    whose first convolution weighs the mask channel up, so that where the mask falls in latents shows in the frames."""
    folder = make_tiny_sd(tmp_path_factory.mktemp("inpaint") / "model", vae_blocks=2, unet_in_channels=9, seed=4)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        unet.conv_in.weight[:, 4] *= 20
    unet.save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def inpaint_model(inpaint_dir):
    return load_model(str(inpaint_dir), CPU)


def _mask(path: Path) -> Path:
    """A rectangle whose edges fall between latent pixels (odd columns and rows), so shrinking it matters."""
    mask = np.zeros((H, W), np.uint8)
    mask[7:31, 5:37] = 255
    Image.fromarray(mask).save(path)
    return path


def _render(model, inputs: Path, out: Path, **overrides) -> list[np.ndarray]:
    settings = build_settings(overrides={**RUN, "model": str(model.path), **overrides})
    render(settings, str(inputs), str(out) + "/", quiet=True, model=model)
    return read_frames(out)


def _diffusers(model, sampler: str, frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pipe = StableDiffusionInpaintPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=reference_scheduler(sampler, model.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(
        prompt=RUN["prompt"], negative_prompt=RUN["negative_prompt"], image=Image.fromarray(frame),
        mask_image=Image.fromarray(mask), strength=RUN["denoising_strength"], num_inference_steps=RUN["steps"],
        guidance_scale=RUN["cfg_scale"], generator=torch.Generator("cpu").manual_seed(RUN["seed"]), height=H, width=W,
        padding_mask_crop=None,
    ).images[0])


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_the_model_is_known_as_an_inpainting_model(inpaint_model, demo_model):
    assert inpaint_model.is_inpainting and inpaint_model.unet.config.in_channels == 9
    assert inpaint_model.latent_channels == 4
    assert not demo_model.is_inpainting


# Euler and DPM++ 2M Karras are stepped batched (vlrt.model.sampler_steps), LMS by a per-job diffusers scheduler.
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras", "LMS"])
def test_masked_frames_equal_diffusers_inpaint_pipeline(sampler, inpaint_model, clip_folder, tmp_path):
    """Inside the mask each frame is diffusers' inpainting of it with the 9-channel UNet; outside, the input frame exactly."""
    mask_path = _mask(tmp_path / "mask.png")
    mask = np.asarray(Image.open(mask_path))
    inside = mask == 255
    got = _render(inpaint_model, clip_folder, tmp_path / "out", use_mask=True, mask_directory=str(mask_path),
                  sampler_name=sampler, inpainting_fill="original", inpaint_full_res=False)
    frames = read_frames(clip_folder)
    assert len(got) == len(frames) == 6
    worst = 0
    for frame_in, frame_out in zip(frames, got):
        want = _diffusers(inpaint_model, sampler, frame_in, mask)
        worst = max(worst, _max_diff(frame_out[inside], want[inside]))
        assert np.array_equal(frame_out[~inside], frame_in[~inside])
        assert _max_diff(frame_out[inside], frame_in[inside]) > 10  # really repainted
    print(f"{sampler}: max difference inside the mask {worst}/255")
    assert worst <= 2


def test_without_a_mask_the_whole_frame_is_repainted_as_with_a_white_mask(inpaint_model, clip_folder, tmp_path):
    got = _render(inpaint_model, clip_folder, tmp_path / "out", sampler_name="Euler a")
    white = np.full((H, W), 255, np.uint8)
    worst = max(_max_diff(out, _diffusers(inpaint_model, "Euler a", frame, white))
                for frame, out in zip(read_frames(clip_folder), got))
    print(f"no mask: max difference {worst}/255")
    assert worst <= 2


def test_onnx_runtime_renders_what_torch_does(inpaint_model, clip_folder, tmp_path):
    mask_path = _mask(tmp_path / "mask.png")
    options = dict(use_mask=True, mask_directory=str(mask_path), sampler_name="DPM++ 2M Karras", max_batch=4,
                   engines=str(tmp_path / "engines"))
    torch_frames = _render(inpaint_model, clip_folder, tmp_path / "torch", **options)
    ort_frames = _render(inpaint_model, clip_folder, tmp_path / "ort", **{**options, "backend": "ort"})
    worst = max(_max_diff(a, b) for a, b in zip(torch_frames, ort_frames))
    print(f"ort vs torch: max difference {worst}/255")
    assert len(ort_frames) == 6 and worst <= 3
    (unet,) = [p for p in (tmp_path / "engines").glob("*-unet-*") if p.is_dir() and not p.name.startswith(".")]
    inputs = {i.name: i for i in onnx.load(str(unet / "model.onnx"), load_external_data=False).graph.input}
    assert inputs["sample"].type.tensor_type.shape.dim[1].dim_value == 9


def test_a_single_file_inpainting_model_loads_with_4_channel_configs(inpaint_dir, inpaint_model, tmp_path):
    """Shipped configs are the 4-channel models'; the file's UNet keeps its 9 channels and its weights."""
    config = shutil.copytree(inpaint_dir, tmp_path / "config")
    unet_config = config / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "in_channels": 4}))
    path = tmp_path / "inpaint.safetensors"
    save_file(to_original(inpaint_model.unet, inpaint_model.vae, inpaint_model.text_encoder), str(path))
    single = load_model(str(path), CPU, options=ModelOptions(model_config=str(config)))
    assert single.is_inpainting
    mine, theirs = single.unet.state_dict(), inpaint_model.unet.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_unet_of_other_input_channels_is_one_line(tmp_path, clip_folder, capsys):
    folder = make_tiny_sd(tmp_path / "five", vae_blocks=2, unet_in_channels=5)
    with pytest.raises(VlrtError, match="UNet taking 5 input channels and a VAE of 4 latent channels"):
        load_model(str(folder), CPU)
    out = tmp_path / "out.mp4"
    assert main(["render", str(clip_folder), "-o", str(out), "--model", str(folder), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "5 input channels" in err, err


def test_a_controlnet_on_an_inpainting_model_is_one_line(inpaint_dir, demo_model, clip_folder, tmp_path, capsys):
    from controlnet_fixtures import make_tiny_controlnet

    controlnet = make_tiny_controlnet(demo_model, tmp_path / "cn", seed=1)
    out = tmp_path / "out.mp4"
    args = ["render", str(clip_folder), "-o", str(out), "--model", str(inpaint_dir), "--controlnet", str(controlnet), "--quiet"]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot steer an inpainting model" in err, err


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras"])
def test_sdxl_inpainting_equals_diffusers_sdxl_inpaint_pipeline(sampler, clip_folder, tmp_path):
    """The same code runs an SDXL inpainting UNet (9 channels, pooled embedding and sizes per row) as
    `StableDiffusionXLInpaintPipeline` does (no aesthetic score, no watermark)."""
    folder = make_tiny_sdxl(tmp_path / "sdxl", unet_in_channels=9, seed=2)
    model = load_model(str(folder), CPU)
    assert model.is_sdxl and model.is_inpainting
    mask_path = _mask(tmp_path / "mask.png")
    mask = np.asarray(Image.open(mask_path))
    inside = mask == 255
    got = _render(model, clip_folder, tmp_path / "out", use_mask=True, mask_directory=str(mask_path), sampler_name=sampler,
                  max_frames=3)
    pipe = StableDiffusionXLInpaintPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
        tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=reference_scheduler(sampler, model.scheduler_config),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    worst = 0
    for frame_in, frame_out in zip(read_frames(clip_folder)[:3], got):
        want = np.asarray(pipe(
            prompt=RUN["prompt"], negative_prompt=RUN["negative_prompt"], image=Image.fromarray(frame_in),
            mask_image=Image.fromarray(mask), strength=RUN["denoising_strength"], num_inference_steps=RUN["steps"],
            guidance_scale=RUN["cfg_scale"], generator=torch.Generator("cpu").manual_seed(RUN["seed"]), height=H, width=W,
            padding_mask_crop=None,
        ).images[0])
        worst = max(worst, _max_diff(frame_out[inside], want[inside]))
        assert np.array_equal(frame_out[~inside], frame_in[~inside])
        assert _max_diff(frame_out[inside], frame_in[inside]) > 10
    print(f"SDXL {sampler}: max difference inside the mask {worst}/255")
    assert len(got) == 3 and worst <= 2
