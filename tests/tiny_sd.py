"""Tiny random-weight Stable Diffusion folders for tests, and diffusers' own img2img pipeline as the reference.

The built-in demo model covers one configuration (VAE scale factor 2, cross-attention 32); these
folders let tests check that nothing in vlrt assumes it. They use the demo's layout and byte-level
tokenizer, and build in well under a second.

Weights are random, with one exception: a VAE of the demo's block count and latent channels is copied from the trained demo
model. Other VAEs are random; at these channel counts their decoded frames still follow their
inputs, but they are not pictures, so only compare them numerically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from vlrt.demo import DEMO_MODEL_DIR
from vlrt.demo.tokenizer import write_byte_level_tokenizer
from vlrt.demo.train import SCHEDULER_CONFIG, text_encoder_config, unet_config, vae_config


def make_tiny_sd(
    folder: Path,
    *,
    vae_blocks: int = 4,
    latent_channels: int = 4,
    cross_attention_dim: int = 32,
    seed: int = 0,
    sample_size: int = 32,
    unet_in_channels: int | None = None,
) -> Path:
    """Write a diffusers SD folder with VAE scale factor 2 ** (vae_blocks - 1); `sample_size` is in latent pixels.
    `unet_in_channels` other than the latent channels makes another UNet (9: an inpainting model's)."""
    folder = Path(folder)
    write_byte_level_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scale = 2 ** (vae_blocks - 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config(vae_blocks, latent_channels, sample_size * scale))
        config = unet_config(latent_channels, cross_attention_dim, sample_size)
        unet = UNet2DConditionModel(**{**config, "in_channels": unet_in_channels or latent_channels})
        text_encoder = CLIPTextModel(text_encoder_config(cross_attention_dim))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")
    write_byte_level_tokenizer(folder / "tokenizer")
    if _demo_vae_matches(vae_blocks, latent_channels):
        # A trained VAE makes decoded frames real pictures wherever the configuration allows it.
        shutil.rmtree(folder / "vae")
        shutil.copytree(DEMO_MODEL_DIR / "vae", folder / "vae")
    return folder


def _demo_vae_matches(vae_blocks: int, latent_channels: int) -> bool:
    config = DEMO_MODEL_DIR / "vae" / "config.json"
    if not config.is_file():
        return False
    demo = AutoencoderKL.load_config(config.parent)
    return (len(demo["block_out_channels"]), demo["latent_channels"]) == (vae_blocks, latent_channels)


def load_pipeline(folder: Path) -> StableDiffusionImg2ImgPipeline:
    """diffusers' img2img pipeline on a local folder, offline, in float32 on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return StableDiffusionImg2ImgPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
