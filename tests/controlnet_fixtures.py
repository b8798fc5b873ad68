"""Tiny random ControlNets for tests, built from a model's UNet (SD or SDXL), and diffusers' ControlNet img2img pipelines as the reference."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionXLControlNetImg2ImgPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel


def make_tiny_controlnet(model, folder: Path, seed: int) -> Path:
    """A ControlNet of `model`'s UNet whose zero convolutions get random weights, so it steers the frames."""
    hint_blocks = {2: (16, 32), 4: (16, 32, 64), 8: (16, 32, 96, 256)}[model.vae_scale_factor]
    controlnet = ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=hint_blocks)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.6)
    controlnet.save_pretrained(folder)
    return folder


def controlnet_pipeline(model, controlnet_dirs: list[Path], scheduler):
    """diffusers' ControlNet img2img pipeline on the model's own modules (one ControlNet, or several as
    MultiControlNetModel): StableDiffusionControlNetImg2ImgPipeline, or StableDiffusionXLControlNetImg2ImgPipeline
    for an SDXL model (no aesthetic score, an empty negative prompt zeroed, no watermark)."""
    nets = [ControlNetModel.from_pretrained(d, local_files_only=True) for d in controlnet_dirs]
    controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    common = dict(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                  controlnet=controlnet, scheduler=scheduler)
    if model.is_sdxl:
        pipe = StableDiffusionXLControlNetImg2ImgPipeline(
            **common, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
            requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionControlNetImg2ImgPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_killed_render_resumes(run: tuple, tmp_path: Path) -> None:
    """SIGKILL a render of `run` (source, args, reference frames) mid-way, then --resume: its frames
    equal the uninterrupted render's bit for bit."""
    import numpy as np
    from conftest import read_frames
    from test_resume import appears, kill_when, render_here

    source, args, reference = run
    out = tmp_path / "frames"
    command = ["render", str(source), "-o", f"{out}/", *args]
    kill_when(command, appears(out / "000005.png"), tmp_path / "log")
    assert len(read_frames(out)) < len(reference)
    render_here([*command, "--resume"])
    got = read_frames(out)
    assert len(got) == len(reference) == 12
    for image, expected in zip(got, reference):
        np.testing.assert_array_equal(image, expected)


def assert_three_segments_give_one_render(run: tuple, tmp_path: Path) -> None:
    """`--segments 3` on a local Ray instance gives the frames of one render made on one thread (as the
    segment tasks compute)."""
    from conftest import read_frames
    from test_distributed import assert_same_frames

    from vlrt.cli import main
    from vlrt.scale.distributed import import_ray, one_thread, start_local_ray

    source, args, _ = run
    with one_thread():
        assert main(["render", str(source), "-o", f"{tmp_path}/one/", *args]) == 0
    ray = import_ray(local=True)
    start_local_ray(ray, 2)
    try:
        address = ray.get_runtime_context().gcs_address
        assert main(["render", str(source), "-o", f"{tmp_path}/seg/", *args, "--segments", "3", "--ray", address]) == 0
    finally:
        ray.shutdown()
    assert_same_frames(read_frames(tmp_path / "seg"), read_frames(tmp_path / "one"))


def write_diffusers_file(controlnet_dir: Path, path: Path) -> dict:
    """A ControlNet folder's weights as one file in diffusers' own key layout (how most SDXL ControlNets are
    shipped): the state dict saved as it is, with safetensors' save_file or torch.save for .pth."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True).state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state
