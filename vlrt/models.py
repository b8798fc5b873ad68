"""Loading a Stable Diffusion model from disk, never from the network.

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
from vlrt.prompt_embeddings import PromptEncoder

COMPONENTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "scheduler": "scheduler_config.json",
}


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
    prompts: PromptEncoder = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompts = PromptEncoder(self.tokenizer, self.text_encoder, self.device, self.clip_skip)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def encode_prompt(self, text: str) -> torch.Tensor:
        """Text embeddings [1, 77·chunks, D] of a WebUI-syntax prompt, computed once per distinct text."""
        return self.prompts(text)

    def encode_pair(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) of one job, of equal length so that both CFG rows share a UNet call."""
        return self.prompts.pair(prompt, negative)


def resolve_model_path(spec: str) -> tuple[Path, bool]:
    """The folder a --model value names, and whether it is the built-in demo."""
    if not spec:
        raise VlrtError("no model given: pass --model PATH (a diffusers Stable Diffusion folder) or --model demo")
    if spec == "demo":
        from vlrt.demo import DEMO_MODEL_DIR

        return DEMO_MODEL_DIR, True
    path = Path(spec).expanduser()
    if not path.exists():
        raise VlrtError(f"model {spec} does not exist: pass a diffusers Stable Diffusion folder or --model demo")
    if not path.is_dir():
        raise VlrtError(
            f"model {spec} is a file; vlrt reads diffusers-format folders (model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/): convert it with diffusers' conversion script"
        )
    return path, False


def check_model_folder(path: Path) -> None:
    """Name the first missing component before loading anything."""
    for sub, config in COMPONENTS.items():
        folder = path / sub
        if not folder.is_dir():
            raise VlrtError(f"model folder {path} has no {sub}/ folder: it is not a complete diffusers Stable Diffusion model")
        if config and not (folder / config).is_file():
            raise VlrtError(f"model folder {path} is missing {sub}/{config}: re-download or re-convert the model")


def load_model(spec: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Model:
    """Load the UNet, VAE, text encoder, tokenizer and scheduler config of a model folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # vlrt shows its own progress; the libraries' loading bars and notices would only clutter it.
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()

    path, is_demo = resolve_model_path(spec)
    check_model_folder(path)
    kwargs = {"local_files_only": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlrtError(f"model folder {path} could not be loaded: {first}") from None
    if unet.config.time_cond_proj_dim is not None:
        raise VlrtError(f"model {path} is a guidance-distilled (LCM) UNet, which vlrt does not run yet: use an SD 1.x/2.x model")
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return Model(
        name="demo" if is_demo else path.name,
        path=path,
        is_demo=is_demo,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        device=device,
    )
