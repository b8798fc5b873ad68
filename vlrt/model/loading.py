"""Loading a Stable Diffusion model from disk, never from the network: a diffusers folder or a
single-file checkpoint (`checkpoints.py`), with a VAE override (`vae_override.py`), LoRAs fused
(`lora.py`) and CLIP skip.

SD 1.x/2.x and SDXL base-architecture models (two text encoders: `text_encoder_2/`, `tokenizer_2/`
in a folder); an SDXL refiner (one OpenCLIP-G encoder, aesthetic-score conditioning) is refused.

Everything the runtime needs to know about the model (VAE scale factor, latent channels,
scaling factor, cross-attention size, scheduler config) is read from its configs, never assumed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlrt.errors import VlrtError
from vlrt.model.checkpoints import (
    INPAINTING_CHANNELS,
    REFINER,
    check_shipped,
    detect_architecture,
    is_checkpoint_file,
    load_checkpoint,
    read_shapes,
)
from vlrt.model.conditioning import StepEmbeddings, conditioning_pair, text_embeddings
from vlrt.model.lora import apply_loras, lora_specs, untagged_prompt
from vlrt.model.prompt_embeddings import PromptEncoder
from vlrt.model.prompt_syntax import LoraTag
from vlrt.model.textual_inversion import CLIP_G, CLIP_L, EmbeddingFile, read_folder
from vlrt.model.vae_override import load_vae

COMPONENTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "scheduler": "scheduler_config.json",
}
SDXL_COMPONENTS = {**COMPONENTS, "text_encoder_2": "config.json", "tokenizer_2": None}


def latent_channels(unet_in_channels: int) -> int:
    """The VAE's latent channels a UNet taking `unet_in_channels` works on (an inpainting UNet's 9 hold 4)."""
    return 4 if unet_in_channels == INPAINTING_CHANNELS else unet_in_channels


@dataclass
class Model:
    """A loaded model: the torch modules, what the runtime must know about them, and a prompt cache."""

    name: str
    path: Path
    is_demo: bool
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    device: torch.device
    clip_skip: int = 1
    loras: list[dict[str, Any]] = field(default_factory=list)  # what was fused: path, scale, sha256
    lora_tags: tuple[LoraTag, ...] = ()  # the prompt's <lora:…> tags among them, which every prompt must carry
    config_root: Path | None = None  # the folder holding the model's diffusers configs
    embeddings: list[EmbeddingFile] = field(default_factory=list)  # the textual-inversion files prompts may name
    text_encoder_2: torch.nn.Module | None = None  # SDXL's OpenCLIP-G (with projection); None before SDXL
    tokenizer_2: Any = None
    prompts: PromptEncoder = field(init=False, repr=False)
    encoders: tuple[PromptEncoder, ...] = field(init=False, repr=False)  # `prompts`, then SDXL's second

    def __post_init__(self) -> None:
        if self.text_encoder_2 is None:
            self.prompts = PromptEncoder(self.tokenizer, self.text_encoder, self.device, self.clip_skip, embeddings=self.embeddings)
            self.encoders = (self.prompts,)
            return
        # SDXL: both encoders' penultimate layers without the final norm; clip skip moves CLIP-L's only (conditioning.py).
        self.prompts = PromptEncoder(
            self.tokenizer, self.text_encoder, self.device, max(2, self.clip_skip), final_norm=False,
            embeddings=self.embeddings, slot=CLIP_L,
        )
        second = PromptEncoder(
            self.tokenizer_2, self.text_encoder_2, self.device, 2, final_norm=False, embeddings=self.embeddings, slot=CLIP_G
        )
        self.encoders = (self.prompts, second)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_inpainting(self) -> bool:
        """An inpainting UNet: it takes the latents, the mask and the masked image's latents (9 channels)."""
        return int(self.unet.config.in_channels) == INPAINTING_CHANNELS

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def tiny_vae(self) -> bool:
        """A tiny autoencoder (TAESD): its encoder gives the latents themselves, no posterior to sample."""
        return type(self.vae).__name__ == "AutoencoderTiny"

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def encode_prompt(self, text: str) -> torch.Tensor:
        """Text embeddings [1, 77·chunks, D] of a WebUI-syntax prompt (SDXL: both encoders'), computed once per distinct text."""
        return text_embeddings(self.encoders, untagged_prompt(text, self.lora_tags))

    def encode_pair(
        self, prompt: str, negative: str, steps: int, size: tuple[int, int]
    ) -> tuple[StepEmbeddings, StepEmbeddings]:
        """(cond, uncond) UNet inputs of one job over its prompts' schedules of `steps` steps, rendered at
        `size` (height, width), all of one prompt length so that both CFG rows share a UNet call. The
        negative prompt's `<…>` stays text, as in the WebUI, which applies the prompt's tags only."""
        return conditioning_pair(self.encoders, untagged_prompt(prompt, self.lora_tags), negative, steps, size)


@dataclass(frozen=True)
class ModelOptions:
    """What changes a model as it is loaded: a VAE in place of its own, LoRAs (files, and the
    prompt's tags found in a folder), CLIP skip, the textual-inversion embeddings' folder, and for
    single-file checkpoints the config folder and the prediction type."""

    vae: str = ""
    loras: tuple[str, ...] = ()
    lora_tags: tuple[LoraTag, ...] = ()
    lora_dir: str = ""
    clip_skip: int = 1
    embeddings_dir: str = ""
    model_config: str = ""
    prediction_type: str = "auto"


def resolve_model_path(spec: str) -> tuple[Path, bool]:
    """The folder or checkpoint file a --model value names, and whether it is the built-in demo."""
    if not spec:
        raise VlrtError("no model given: pass --model PATH (a diffusers Stable Diffusion folder or .safetensors/.ckpt file) or --model demo")
    if spec == "demo":
        from vlrt.demo import DEMO_MODEL_DIR

        return DEMO_MODEL_DIR, True
    path = Path(spec).expanduser()
    if not path.exists():
        raise VlrtError(f"model {spec} does not exist: pass a diffusers Stable Diffusion folder, a .safetensors/.ckpt file or --model demo")
    if not path.is_dir() and not is_checkpoint_file(path):
        raise VlrtError(
            f"model {spec} is a file but not a .safetensors or .ckpt checkpoint; vlrt reads those and diffusers-format "
            "folders (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    return path, False


def is_sdxl_folder(path: Path) -> bool:
    """Whether a diffusers folder is SDXL's (a second text encoder or tokenizer)."""
    return (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir()


def check_model_folder(path: Path) -> None:
    """Refuse an SDXL refiner and name the first missing component, before loading anything."""
    sdxl = is_sdxl_folder(path)
    if sdxl:
        index = path / "model_index.json"
        pipeline = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
        if pipeline.get("requires_aesthetics_score") or not (path / "text_encoder").is_dir():
            raise VlrtError(f"model folder {path} is {REFINER}")
    for sub, config in (SDXL_COMPONENTS if sdxl else COMPONENTS).items():
        folder = path / sub
        if not folder.is_dir():
            raise VlrtError(f"model folder {path} has no {sub}/ folder: it is not a complete diffusers Stable Diffusion model")
        if config and not (folder / config).is_file():
            raise VlrtError(f"model folder {path} is missing {sub}/{config}: re-download or re-convert the model")


def load_model(
    spec: str, device: torch.device, dtype: torch.dtype = torch.float32, options: ModelOptions = ModelOptions()
) -> Model:
    """Load the UNet, VAE, text encoder, tokenizer and scheduler config of a model folder or
    single-file checkpoint, offline, with `options` applied (VAE, LoRAs fused, CLIP skip)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import transformers

    # vlrt shows its own progress; the libraries' loading bars and notices would only clutter it.
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()

    path, is_demo = resolve_model_path(spec)
    embeddings = read_folder(options.embeddings_dir) if options.embeddings_dir else []
    if path.is_dir():
        modules, scheduler_config, config_root = _load_folder(path, dtype, options)
    else:
        modules, scheduler_config, config_root = _load_file(path, dtype, options)
    if modules["unet"].config.time_cond_proj_dim is not None:
        raise VlrtError(f"model {path} is a guidance-distilled (LCM) UNet, which vlrt does not run yet: use an SD 1.x/2.x model")
    unet_in, vae_latents = int(modules["unet"].config.in_channels), int(modules["vae"].config.latent_channels)
    if latent_channels(unet_in) != vae_latents:
        raise VlrtError(
            f"model {path} has a UNet taking {unet_in} input channels and a VAE of {vae_latents} latent channels: vlrt runs "
            f"UNets taking the VAE's latents ({vae_latents}), or inpainting UNets taking 9 (latents, mask, masked-image latents) "
            "with a 4-channel VAE"
        )
    if options.prediction_type != "auto":
        scheduler_config = {**scheduler_config, "prediction_type": options.prediction_type}
    loras = apply_loras(modules, scheduler_config, lora_specs(options.loras, options.lora_tags, options.lora_dir))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in modules:
            modules[name].to(device).eval().requires_grad_(False)
    return Model(
        name="demo" if is_demo else path.stem,
        path=path,
        is_demo=is_demo,
        **modules,
        scheduler_config=scheduler_config,
        device=device,
        clip_skip=options.clip_skip,
        loras=loras,
        lora_tags=options.lora_tags,
        config_root=config_root,
        embeddings=embeddings,
    )


def _load_folder(path: Path, dtype: torch.dtype, options: ModelOptions) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """A diffusers folder's modules, its scheduler config, and the folder its configs are in."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_model_folder(path)
    kwargs = {"local_files_only": True, "torch_dtype": dtype}
    second: dict[str, Any] = {}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        vae = None if options.vae else AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        if is_sdxl_folder(path):
            second = {
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", local_files_only=True, dtype=dtype),
                "tokenizer_2": CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True),
            }
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlrtError(f"model folder {path} could not be loaded: {first}") from None
    if vae is None:
        vae = load_vae(options.vae, model_vae_config=path, latent_channels=latent_channels(unet.config.in_channels), dtype=dtype)
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, **second}
    return modules, scheduler_config, path


def _load_file(path: Path, dtype: torch.dtype, options: ModelOptions) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """A single-file checkpoint's modules, converted with shipped (or the given) configs."""
    config = Path(options.model_config).expanduser() if options.model_config else None
    arch = detect_architecture(read_shapes(path), path)
    if config is None:
        check_shipped(arch, path)
        config = arch.config_folder(options.prediction_type)
    vae = None
    if options.vae:
        vae = load_vae(options.vae, model_vae_config=config, latent_channels=latent_channels(arch.unet_in_channels), dtype=dtype)
    pipe, scheduler_config = load_checkpoint(path, arch=arch, config=config, dtype=dtype, vae=vae)
    names = ("unet", "vae", "text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if arch.is_sdxl else ())
    modules = {name: getattr(pipe, name) for name in names}
    return modules, scheduler_config, config
