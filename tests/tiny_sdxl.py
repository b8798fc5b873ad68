"""A tiny random-weight SDXL for tests, and diffusers' own SDXL img2img pipeline as the reference.

Built from configs like SDXL base's, only small: a UNet with `addition_embed_type="text_time"`
(pooled embedding + six size numbers), CLIP-L-like and OpenCLIP-G-like text encoders (the second
with a projection), two byte-level tokenizers (the second pads with "!", as SDXL's OpenCLIP does),
and the demo's trained VAE (scale factor 2), so decoded frames are pictures.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from vlrt.demo import DEMO_MODEL_DIR
from vlrt.demo.tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, byte_level_vocab, write_byte_level_tokenizer
from vlrt.demo.train import SCHEDULER_CONFIG

WIDTHS = (32, 40)  # the two text encoders' hidden sizes: cross-attention 72
POOLED = 24  # the second encoder's projection
TIME_EMBED = 8  # addition_time_embed_dim: six sizes of 8 each


def text_config(hidden: int, layers: int) -> CLIPTextConfig:
    vocab, _ = byte_level_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=POOLED,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN],
    )


def unet_config() -> dict:
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 48],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 2],
        "attention_head_dim": [4, 8],
        "norm_num_groups": 8,
        "use_linear_projection": True,
        "cross_attention_dim": sum(WIDTHS),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED,
        "projection_class_embeddings_input_dim": 6 * TIME_EMBED + POOLED,
    }


def write_tokenizer(folder: Path, pad_token: str) -> None:
    write_byte_level_tokenizer(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((folder / name).read_text(encoding="utf-8"))
        config["pad_token"] = pad_token
        (folder / name).write_text(json.dumps(config, indent=2), encoding="utf-8")


def make_tiny_sdxl(folder: Path, seed: int = 0, unet_in_channels: int = 4) -> Path:
    """Write a diffusers SDXL folder (StableDiffusionXLImg2ImgPipeline layout); a UNet taking 9 channels is an inpainting model's."""
    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**unet_config(), "in_channels": unet_in_channels})
        text_encoder = CLIPTextModel(text_config(WIDTHS[0], 3))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(WIDTHS[1], 3))
    write_tokenizer(folder / "tokenizer", EOS_TOKEN)
    write_tokenizer(folder / "tokenizer_2", "!")
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=AutoencoderKL.from_pretrained(DEMO_MODEL_DIR / "vae", torch_dtype=torch.float32),
        text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=unet, scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for name, pad in (("tokenizer", EOS_TOKEN), ("tokenizer_2", "!")):
        shutil.rmtree(folder / name)
        write_tokenizer(folder / name, pad)
    return folder


def load_sdxl_pipeline(folder: Path) -> StableDiffusionXLImg2ImgPipeline:
    """diffusers' SDXL img2img pipeline on a local folder, offline, in float32 on the CPU, no watermark."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return StableDiffusionXLImg2ImgPipeline.from_pretrained(
        folder, local_files_only=True, add_watermarker=False, dtype=torch.float32
    )
