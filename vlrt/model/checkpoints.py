"""Single-file SD 1.x / 2.x / SDXL checkpoints (`.safetensors`, `.ckpt`) in the original key layout, offline.

The architecture is read from the checkpoint's keys and shapes before anything is converted:
- a UNet under `model.diffusion_model.` taking 4 latent channels, or 9 for an inpainting model (4 latent,
  1 mask, 4 masked-image latent channels);
- the text encoder: OpenAI CLIP under `cond_stage_model.transformer.` (SD 1.x) or OpenCLIP under
  `cond_stage_model.model.` (SD 2.x), with the UNet's cross-attention width to match (768 / 1024);
- SDXL: CLIP-L under `conditioner.embedders.0.transformer.` and OpenCLIP-G under
  `conditioner.embedders.1.model.` (cross-attention 2048, the UNet's `label_emb` taking the pooled
  embedding and sizes); an SDXL refiner (OpenCLIP-G alone, as `conditioner.embedders.0.model.`) is
  refused, as are a LoRA or a lone VAE given as --model, each named as such.

diffusers converts the weights (`StableDiffusionPipeline.from_single_file`, for SDXL
`StableDiffusionXLPipeline`'s), with the diffusers configs vlrt ships in `model_configs/` (`sd1`,
`sd2` for 512 epsilon models, `sd2-v` for 768 v-prediction, `sdxl` for SDXL base 1.0's
architecture), or with the config folder the user names (`--model-config`), which may also hold
the tokenizers. SDXL's two tokenizers share CLIP's vocabulary (`clip_vocab`); the second pads with
`!` (token 0), as OpenCLIP does. The keys cannot tell SD 2.x v-prediction from epsilon models apart; like diffusers,
vlrt takes SD 2.x as v-prediction (2.0-v, 2.1 and their fine-tunes) unless `prediction_type` says
otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlrt.errors import VlrtError

CONFIGS = Path(__file__).resolve().parent / "model_configs"
SUFFIXES = (".safetensors", ".ckpt")

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
CROSS_ATTENTION = ".attn2.to_k.weight"  # [inner, cross-attention width] in every UNet transformer block
CLIP_TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
OPEN_CLIP_TOKENS = "cond_stage_model.model.token_embedding.weight"
SDXL_CLIP_TOKENS = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_OPEN_CLIP_TOKENS = "conditioner.embedders.1.model.token_embedding.weight"
REFINER_OPEN_CLIP_TOKENS = "conditioner.embedders.0.model.token_embedding.weight"
VAE_IN = "first_stage_model.encoder.conv_in.weight"
INPAINTING_CHANNELS = 9  # an inpainting UNet's: latents (4), mask (1), masked-image latents (4)
UNET_CHANNELS = (4, INPAINTING_CHANNELS)
KNOWN_WIDTHS = {"clip": 768, "open_clip": 1024, "sdxl": 2048}
FAMILIES = {"clip": "SD 1.x", "open_clip": "SD 2.x", "sdxl": "SDXL"}
REFINER = (
    "an SDXL refiner (one OpenCLIP-G text encoder, aesthetic-score conditioning), which vlrt does not run: "
    "use an SDXL base-architecture model (SDXL base, Pony, Illustrious, NoobAI and their fine-tunes)"
)


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint's keys say it is."""

    text_encoder: str  # "clip" (SD 1.x), "open_clip" (SD 2.x) or "sdxl" (both: CLIP-L and OpenCLIP-G)
    cross_attention_dim: int
    has_vae: bool
    unet_in_channels: int = 4  # 9 for an inpainting model

    @property
    def family(self) -> str:
        return FAMILIES[self.text_encoder]

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder == "sdxl"

    def config_folder(self, prediction_type: str) -> Path:
        """The shipped diffusers configs for this architecture and prediction type."""
        if self.text_encoder in ("clip", "sdxl"):
            return CONFIGS / ("sd1" if self.text_encoder == "clip" else "sdxl")
        return CONFIGS / ("sd2" if prediction_type == "epsilon" else "sd2-v")


def family(width: int) -> str:
    """The architecture a cross-attention width belongs to, in words."""
    names = {KNOWN_WIDTHS[k]: FAMILIES[k] for k in KNOWN_WIDTHS}
    return f"{names.get(width, 'an architecture vlrt does not know')} (cross-attention width {width})"


def is_checkpoint_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, without reading the weights of a .safetensors file."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise VlrtError(f"{path} is not a readable .safetensors file ({_first_line(exc)})") from None
    return {k: tuple(v.shape) for k, v in read_torch_checkpoint(path).items() if isinstance(v, torch.Tensor)}


def read_torch_checkpoint(path: Path) -> dict[str, Any]:
    """A .ckpt's state dict, loaded safely (tensors only: a pickle that holds code is refused)."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise VlrtError(
            f"{path} cannot be read as a safe .ckpt ({_first_line(exc)}): convert it to .safetensors"
        ) from None
    while isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise VlrtError(f"{path} holds no state dict: it is not a Stable Diffusion checkpoint")
    return data


def detect_architecture(shapes: Mapping[str, tuple[int, ...]], path: Path) -> Architecture:
    """SD 1.x, 2.x or SDXL from the keys, or a VlrtError naming the file and what was found instead."""
    if UNET_IN not in shapes:
        raise VlrtError(f"{path} is not a Stable Diffusion checkpoint: {_what_it_is(shapes)}")
    if REFINER_OPEN_CLIP_TOKENS in shapes:
        raise VlrtError(f"{path} is {REFINER}")
    in_channels = shapes[UNET_IN][1]
    if in_channels not in UNET_CHANNELS:
        raise VlrtError(
            f"{path} has a UNet taking {in_channels} input channels (not an img2img model); vlrt runs SD 1.x/2.x/SDXL "
            "models taking 4 (img2img) or 9 (inpainting)"
        )
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        if SDXL_CLIP_TOKENS not in shapes or SDXL_OPEN_CLIP_TOKENS not in shapes:
            raise VlrtError(f"{path} has SDXL conditioner keys but not both SDXL text encoders ({SDXL_CLIP_TOKENS}, {SDXL_OPEN_CLIP_TOKENS})")
        text_encoder = "sdxl"
    elif CLIP_TOKENS in shapes:
        text_encoder = "clip"
    elif OPEN_CLIP_TOKENS in shapes:
        text_encoder = "open_clip"
    else:
        raise VlrtError(f"{path} has a UNet but no SD 1.x (CLIP) or SD 2.x (OpenCLIP) text encoder keys (cond_stage_model.*)")
    widths = [shape[1] for key, shape in shapes.items() if key.startswith("model.diffusion_model.") and key.endswith(CROSS_ATTENTION)]
    if not widths:
        raise VlrtError(f"{path} has a UNet without cross-attention (no attn2 keys): it is not a text-to-image SD model")
    return Architecture(text_encoder, widths[0], VAE_IN in shapes, in_channels)


def check_shipped(arch: Architecture, path: Path) -> None:
    """Refuse an architecture vlrt ships no configs for, saying what was found."""
    if arch.cross_attention_dim != KNOWN_WIDTHS[arch.text_encoder]:
        raise VlrtError(
            f"{path} has an unknown architecture: a {arch.text_encoder} text encoder with cross-attention width "
            f"{arch.cross_attention_dim} (SD 1.x has 768, SD 2.x 1024, SDXL 2048); pass --model-config with its diffusers config folder"
        )


def _config_in_channels(config: Path) -> int:
    return int(json.loads((config / "unet" / "config.json").read_text(encoding="utf-8"))["in_channels"])


def _unet(path: Path, config: Path, arch: Architecture, dtype: torch.dtype) -> Any:
    """The checkpoint's UNet with the config's architecture but the checkpoint's input channels: the
    shipped configs are the 4-channel models', an inpainting file's UNet takes 9."""
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_single_file(
            str(path), config=str(config), subfolder="unet", in_channels=arch.unet_in_channels, local_files_only=True,
            torch_dtype=dtype,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise VlrtError(f"{path} could not be loaded as {arch.family} with the configs in {config}: {_first_line(exc)}") from None


def _what_it_is(shapes: Mapping[str, tuple[int, ...]]) -> str:
    keys = list(shapes)
    if not keys:
        return "it holds no tensors"
    if any("lora_" in k for k in keys[:50]):
        return "it looks like a LoRA (pass it with --lora)"
    if any(k.startswith(("encoder.down", "decoder.up", "first_stage_model.")) for k in keys):
        return "it looks like a VAE (pass it with --vae)"
    return f"found {len(keys)} tensors and no UNet (model.diffusion_model.*), e.g. {keys[0]!r}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(
    path: Path, *, arch: Architecture, config: Path, dtype: torch.dtype, vae: torch.nn.Module | None = None
) -> tuple[Any, dict[str, Any]]:
    """The diffusers pipeline of a single-file checkpoint (UNet, VAE, text encoder, tokenizer),
    converted with the configs in `config`, and its scheduler config. `vae` replaces the
    checkpoint's own (which may then be missing). The tokenizer is the config folder's if it has
    one, else CLIP's (`clip_vocab`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from vlrt.model.clip_vocab import SD2_PAD, clip_tokenizer

    if not (config / "model_index.json").is_file():
        raise VlrtError(f"model_config {config} is not a diffusers config folder (no model_index.json)")
    if not arch.has_vae and vae is None:
        raise VlrtError(f"{path} holds no VAE (first_stage_model.*): pass one with --vae")
    def tokenizer(folder: str, pad: str) -> CLIPTokenizer:
        if (config / folder).is_dir():
            return CLIPTokenizer.from_pretrained(config / folder, local_files_only=True)
        return clip_tokenizer(pad)

    extra: dict[str, Any] = {"vae": vae} if vae is not None else {}
    if _config_in_channels(config) != arch.unet_in_channels:
        extra["unet"] = _unet(path, config, arch, dtype)
    try:
        if arch.is_sdxl:
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(config), tokenizer=tokenizer("tokenizer", "<|endoftext|>"),
                tokenizer_2=tokenizer("tokenizer_2", SD2_PAD), local_files_only=True, torch_dtype=dtype, **extra,
            )
        else:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config), tokenizer=tokenizer("tokenizer", SD2_PAD if arch.text_encoder == "open_clip" else "<|endoftext|>"),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True,
                torch_dtype=dtype, **extra,
            )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise VlrtError(f"{path} could not be loaded as {arch.family} with the configs in {config}: {_first_line(exc)}") from None
    scheduler_config = json.loads((config / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return pipe, scheduler_config
