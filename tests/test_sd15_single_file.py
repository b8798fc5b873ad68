"""The real SD 1.5 layout as one .safetensors file (random weights): loaded offline with vlrt's
shipped configs and CLIP's vocabulary, it renders what the same weights in diffusers folder form do.

Slow (about 1.1 B parameters built, written twice and loaded twice; several GB of memory):
`pytest -m slow tests/test_sd15_single_file.py -s` prints the timings and the largest difference.
"""

from __future__ import annotations

import shutil
import socket
import time

import numpy as np
import pytest
import torch
from conftest import read_frames
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from original_layout import to_original
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from vlrt.model.checkpoints import CONFIGS
from vlrt.model.clip_vocab import clip_tokenizer
from vlrt.model.loading import load_model
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def test_sd15_single_file_renders_like_the_diffusers_folder(clip_folder, tmp_path, monkeypatch):
    start = time.perf_counter()
    laps = []

    def lap(name: str) -> None:
        laps.append(f"{name} {time.perf_counter() - start:.0f} s")

    folder = CONFIGS / "sd1"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    for module in (unet, vae, text):
        module.to(torch.float16)  # stored as fp16 (as SD 1.5 files usually are), loaded as fp32 by both
    lap("built")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd15", safe_serialization=True)
    # save_pretrained writes the scheduler's defaults out (timestep_spacing "leading"), which the
    # Euler-family samplers would then read; SD 1.5's own folder, like the shipped config, has none.
    shutil.copy(folder / "scheduler" / "scheduler_config.json", tmp_path / "sd15" / "scheduler" / "scheduler_config.json")
    single = tmp_path / "sd15.safetensors"
    save_file(to_original(unet, vae, text), str(single))
    del pipe, unet, vae, text
    lap("written")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    frames, models = {}, {}
    for name, spec in (("folder", tmp_path / "sd15"), ("single", single)):
        models[name] = load_model(str(spec), CPU)
        lap(f"{name} loaded")
        settings = build_settings(overrides=dict(
            model=str(spec), backend="torch", loop_n=1, steps=4, denoising_strength=0.5, cfg_scale=7.0, seed=11,
            max_frames=2, width=64, height=48, prompt="a (photo:1.2) of a cat, BREAK oil painting", negative_prompt="blurry",
        ))
        render(settings, str(clip_folder), str(tmp_path / name) + "/", quiet=True, model=models[name])
        frames[name] = read_frames(tmp_path / name)
        lap(f"{name} rendered")
    assert models["single"].tokenizer("a photo of a cat").input_ids == models["folder"].tokenizer("a photo of a cat").input_ids
    for component in ("unet", "vae", "text_encoder"):
        a, b = getattr(models["single"], component).state_dict(), getattr(models["folder"], component).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    diff = max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(frames["single"], frames["folder"]))
    print(f"\nSD 1.5 single file vs folder: {', '.join(laps)}; max pixel difference {diff}/255")
    assert len(frames["single"]) == 2 and diff <= 1
