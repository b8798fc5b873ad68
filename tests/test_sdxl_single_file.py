"""The real SDXL base architecture as one .safetensors file in sgm's layout (random weights): loaded offline
with vlrt's shipped configs and CLIP's vocabulary for both tokenizers, it renders what the same weights in
diffusers folder form do.

Slow and large (a 2.6 B-parameter UNet, 3.5 B parameters in all, 7 GB in fp16; both forms are loaded and
rendered in fp16 (the VAE in fp32, as SDXL's always is), one after the other, so that the machine never
holds more than one model, nor any in fp32):
`pytest -m slow tests/test_sdxl_single_file.py -s` prints the timings and the largest difference.
"""

from __future__ import annotations

import gc
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from conftest import read_frames
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from original_layout import sdxl_to_original
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from vlrt.model.checkpoints import CONFIGS
from vlrt.model.clip_vocab import SD2_PAD, clip_tokenizer
from vlrt.model.loading import load_model
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _build(folder):
    """SDXL base's four networks from the shipped configs, random, in fp16 (each made in fp32, then halved)."""
    torch.manual_seed(0)
    made = {}
    for name, make in (
        ("unet", lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))),
        ("vae", lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))),
    ):
        made[name] = make().to(torch.float16)
    return made


def test_sdxl_single_file_renders_like_the_diffusers_folder(clip_folder, tmp_path, monkeypatch):
    start = time.perf_counter()
    laps = []

    def lap(name: str) -> None:
        laps.append(f"{name} {time.perf_counter() - start:.0f} s")

    configs = CONFIGS / "sdxl"
    modules = _build(configs)
    assert sum(p.numel() for p in modules["unet"].parameters()) == 2_567_463_684
    lap("built")
    pipe = StableDiffusionXLPipeline(
        **modules, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(SD2_PAD),
        scheduler=EulerDiscreteScheduler.from_pretrained(configs / "scheduler"), add_watermarker=False,
    )
    pipe.save_pretrained(tmp_path / "sdxl", safe_serialization=True)
    shutil.copy(configs / "scheduler" / "scheduler_config.json", tmp_path / "sdxl" / "scheduler" / "scheduler_config.json")
    single = tmp_path / "sdxl.safetensors"
    save_file(sdxl_to_original(*(modules[name] for name in COMPONENTS)), str(single))
    del pipe, modules
    gc.collect()
    lap("written")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    frames = {}
    for name, spec in (("folder", tmp_path / "sdxl"), ("single", single)):
        model = load_model(str(spec), CPU, dtype=torch.float16)
        lap(f"{name} loaded")
        assert model.is_sdxl and model.tokenizer_2.pad_token == "!"
        if name == "single":  # every weight is the folder's, read from its files one tensor at a time
            for component in COMPONENTS:
                state = getattr(model, component).state_dict()
                files = sorted((tmp_path / "sdxl" / component).glob("*.safetensors"))
                seen = 0
                for file in files:
                    with safe_open(str(file), framework="pt") as handle:
                        for key in handle.keys():
                            assert torch.equal(state[key], handle.get_tensor(key)), (component, key)
                            seen += 1
                assert seen == len([k for k in state if not k.endswith("position_ids")]), component
            lap("weights compared")
        settings = build_settings(overrides=dict(
            model=str(spec), backend="torch", loop_n=1, steps=4, denoising_strength=0.5, cfg_scale=7.0, seed=11,
            max_frames=2, width=64, height=48, precision="fp16", prompt="a (photo:1.2) of a cat, BREAK oil painting", negative_prompt="",
        ))
        render(settings, str(clip_folder), str(tmp_path / name) + "/", quiet=True, model=model)
        frames[name] = read_frames(tmp_path / name)
        del model
        gc.collect()
        lap(f"{name} rendered")
    diff = max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(frames["single"], frames["folder"]))
    print(f"\nSDXL single file vs folder: {', '.join(laps)}; max pixel difference {diff}/255")
    assert len(frames["single"]) == 2 and diff == 0
