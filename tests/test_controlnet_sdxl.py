"""ControlNet units on SDXL: a tiny random SDXL ControlNet (diffusers' ControlNetModel with the UNet's
added text/time conditioning) on the tiny SDXL, against diffusers' StableDiffusionXLControlNetImg2ImgPipeline;
ONNX Runtime against torch; ControlNets of the other family, folders or single files, refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import read_frames, reference_scheduler
from controlnet_fixtures import controlnet_pipeline, make_tiny_controlnet, write_diffusers_file
from diffusers import ControlNetModel
from original_layout import controlnet_to_original
from PIL import Image
from safetensors.torch import save_file
from tiny_sdxl import POOLED, WIDTHS

from vlrt.cli import main
from vlrt.export.trt_build import profile_shapes
from vlrt.model.conditioning import time_ids
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

PROMPT, NEGATIVE = "a watercolour fox", "blurry"
H, W = 48, 64  # clip_folder's frames


@pytest.fixture(scope="module")
def sdxl_controlnet_dirs(sdxl_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_controlnets")
    return [make_tiny_controlnet(sdxl_model, folder / f"cn{i}", seed=10 + i) for i in range(2)]


def _settings(sdxl_dir, **overrides):
    base = dict(
        model=str(sdxl_dir), backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name="Euler a", steps=8,
        denoising_strength=0.6, cfg_scale=6.0, seed=4321, prompt=PROMPT, negative_prompt=NEGATIVE, max_frames=3,
    )
    return build_settings(overrides={**base, **overrides})


def _scheduler(model, sampler: str):
    return reference_scheduler(sampler, model.scheduler_config)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_tiny_sdxl_controlnet_takes_the_added_conditioning_and_gives_nonzero_residuals(sdxl_model, sdxl_controlnet_dirs):
    """The fixture is an SDXL ControlNet of the tiny SDXL's UNet whose residuals are not zero (the zero
    convolutions were randomised), and they depend on the pooled embedding and sizes it is given."""
    net = ControlNetModel.from_pretrained(sdxl_controlnet_dirs[0], local_files_only=True)
    config = net.config
    assert config.addition_embed_type == "text_time" and config.cross_attention_dim == sum(WIDTHS)
    assert config.projection_class_embeddings_input_dim == sdxl_model.unet.config.projection_class_embeddings_input_dim
    g = torch.Generator().manual_seed(0)
    feed = dict(sample=torch.randn(1, 4, H // 2, W // 2, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 77, sum(WIDTHS), generator=g),
                controlnet_cond=torch.rand(1, 3, H, W, generator=g))
    pooled = torch.randn(1, POOLED, generator=g)
    with torch.no_grad():
        down, mid = net(**feed, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(H, W)}, return_dict=False)
        other, _ = net(**feed, added_cond_kwargs={"text_embeds": -pooled, "time_ids": time_ids(H, W)}, return_dict=False)
    assert all(r.abs().max() > 0.1 for r in (*down, mid))
    assert (down[-1] - other[-1]).abs().max() > 1e-3


def test_one_unit_on_sdxl_equals_diffusers_sdxl_controlnet_img2img(sdxl_model, sdxl_dir, sdxl_controlnet_dirs, clip_folder,
                                                                    tmp_path):
    """One unit (module none: the input frame is the control image), weight 0.8, a guidance range that switches it
    off for the last steps: every frame is diffusers' SDXL ControlNet img2img's with the same components, its
    time ids (original size = target size = render size, crop 0, 0) those vlrt gives."""
    unit = f"model={sdxl_controlnet_dirs[0]},weight=0.8,guidance_start=0.0,guidance_end=0.7"
    render(_settings(sdxl_dir, controlnet=[unit]), str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=sdxl_model)
    render(_settings(sdxl_dir), str(clip_folder), str(tmp_path / "plain") + "/", quiet=True, model=sdxl_model)
    pipe = controlnet_pipeline(sdxl_model, sdxl_controlnet_dirs[:1], _scheduler(sdxl_model, "Euler a"))
    inputs, outputs, without = read_frames(clip_folder)[:3], read_frames(tmp_path / "out"), read_frames(tmp_path / "plain")
    assert len(outputs) == 3
    diffs = []
    for frame_in, frame_out in zip(inputs, outputs):
        expected = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(frame_in), control_image=Image.fromarray(frame_in),
            strength=0.6, num_inference_steps=8, guidance_scale=6.0, controlnet_conditioning_scale=0.8,
            control_guidance_start=0.0, control_guidance_end=0.7, original_size=(H, W), target_size=(H, W),
            crops_coords_top_left=(0, 0), generator=torch.Generator("cpu").manual_seed(4321),
        ).images[0]
        diffs.append(_max_diff(frame_out, np.asarray(expected)))
    print("DIFFS", diffs)
    assert max(diffs) <= 2, diffs
    # The ControlNet measurably changes the frames (the comparison above could fail).
    assert np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(outputs, without)]) > 2


def test_two_units_on_sdxl_equal_multicontrolnet(sdxl_model, sdxl_dir, sdxl_controlnet_dirs, clip_folder, tmp_path):
    """Two units with their own weights and guidance starts, both fed the input frame, against MultiControlNetModel."""
    units = [f"model={sdxl_controlnet_dirs[0]},weight=0.7", f"model={sdxl_controlnet_dirs[1]},weight=1.2,guidance_start=0.3"]
    render(_settings(sdxl_dir, controlnet=units, steps=4, max_frames=2), str(clip_folder), str(tmp_path / "out") + "/",
           quiet=True, model=sdxl_model)
    pipe = controlnet_pipeline(sdxl_model, sdxl_controlnet_dirs, _scheduler(sdxl_model, "Euler a"))
    outputs = read_frames(tmp_path / "out")
    assert len(outputs) == 2
    for frame_in, frame_out in zip(read_frames(clip_folder), outputs):
        expected = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(frame_in), control_image=[Image.fromarray(frame_in)] * 2,
            strength=0.6, num_inference_steps=4, guidance_scale=6.0, controlnet_conditioning_scale=[0.7, 1.2],
            control_guidance_start=[0.0, 0.3], control_guidance_end=[1.0, 1.0], generator=torch.Generator("cpu").manual_seed(4321),
        ).images[0]
        assert _max_diff(frame_out, np.asarray(expected)) <= 2


def test_ort_equals_torch_with_sdxl_controlnets(sdxl_model, sdxl_dir, sdxl_controlnet_dirs, clip_folder, tmp_path):
    """--backend ort (the exported SDXL ControlNets and the UNet with residual inputs, both taking text_embeds and
    time_ids per row) equals --backend torch within 3/255, with the two control modes that change the rows."""
    units = [f"model={sdxl_controlnet_dirs[0]},weight=0.9,control_mode=My prompt is more important",
             f"model={sdxl_controlnet_dirs[1]},weight=0.6,guidance_start=0.25,control_mode=ControlNet is more important"]
    runs = {}
    for backend in ("torch", "ort"):
        settings = _settings(sdxl_dir, controlnet=units, backend=backend, steps=4, engines=str(tmp_path / "engines"))
        result = render(settings, str(clip_folder), str(tmp_path / backend) + "/", quiet=True, model=sdxl_model)
        runs[backend] = read_frames(tmp_path / backend)
        assert result.engine_calls["controlnet_1"] > 0
    assert len(runs["ort"]) == 3
    assert max(_max_diff(a, b) for a, b in zip(runs["torch"], runs["ort"])) <= 3
    engines = tmp_path / "engines"
    (unet,) = [p for p in engines.glob("*-unet_control-*") if p.is_dir() and not p.name.startswith(".")]
    controlnets = [p for p in engines.glob("*-controlnet-*") if p.is_dir() and not p.name.startswith(".")]
    assert len(controlnets) == 2
    inputs = [i.name for i in onnx.load(str(controlnets[0] / "model.onnx")).graph.input]
    assert inputs == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "controlnet_cond",
                      "conditioning_scale"]
    inputs = [i.name for i in onnx.load(str(unet / "model.onnx")).graph.input]
    assert inputs[:5] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert inputs[-1] == "mid_block_res"
    # A TensorRT plan of the ControlNet gets a batch range for the added conditioning too (built where TensorRT is).
    shapes = profile_shapes(controlnets[0] / "model.onnx", 8)
    assert shapes["text_embeds"] == ((1, POOLED), (8, POOLED), (8, POOLED)) and shapes["time_ids"] == ((1, 6), (8, 6), (8, 6))


@pytest.mark.parametrize("case", ["sd_controlnet_on_sdxl", "sdxl_controlnet_on_sd", "sd_controlnet_file_on_sdxl",
                                  "sdxl_controlnet_file_on_sd"])
def test_controlnet_of_the_other_family_is_one_clear_line(case, sdxl_dir, sdxl_controlnet_dirs, demo_model, tmp_path,
                                                          clip_folder, capsys):
    """An SD 1.x/2.x ControlNet on SDXL and an SDXL ControlNet on SD 1.x/2.x, as folders or single files (an SD 1.5
    one in the original layout, an SDXL one in diffusers' layout), name both families and the fix."""
    if case == "sd_controlnet_on_sdxl":
        unit, model = str(make_tiny_controlnet(demo_model, tmp_path / "sdcn", seed=1)), str(sdxl_dir)
        words = ["is for SD 1.x/2.x (cross-attention width 32) but the model is SDXL (cross-attention width 72)",
                 "use an SDXL ControlNet"]
    elif case == "sdxl_controlnet_on_sd":
        unit, model = str(sdxl_controlnet_dirs[0]), "demo"
        words = ["is for SDXL (cross-attention width 72) but the model is SD 1.x/2.x (cross-attention width 32)",
                 "use a ControlNet made for the model's architecture"]
    elif case == "sd_controlnet_file_on_sdxl":
        network = ControlNetModel.from_pretrained(make_tiny_controlnet(demo_model, tmp_path / "sdcn", seed=1), local_files_only=True)
        unit, model = str(tmp_path / "control_sd15.safetensors"), str(sdxl_dir)
        save_file(controlnet_to_original(network), unit)
        words = ["is for SD 1.x/2.x (cross-attention width 32) but the model is SDXL (cross-attention width 72)",
                 "use an SDXL ControlNet"]
    else:
        unit, model = str(tmp_path / "diffusers_xl_canny.safetensors"), "demo"
        write_diffusers_file(sdxl_controlnet_dirs[0], Path(unit))
        words = ["is for SDXL (cross-attention width 72) but the model is SD 1.x/2.x (cross-attention width 32)",
                 "use a ControlNet made for the model's architecture"]
    out = tmp_path / "result" / "out.mp4"
    code = main(["render", str(clip_folder), "-o", str(out), "--model", model, "--loop-n", "1", "--steps", "2", "--quiet",
                 "--controlnet", unit])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("vlrt: error: ") and "\n" not in err, err
    assert all(w in err for w in words), err
    assert not out.parent.exists() or not any(out.parent.iterdir())
