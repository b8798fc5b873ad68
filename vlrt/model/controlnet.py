"""Loading the ControlNet of each unit, checked against the model it will steer.

A unit's `model` is a diffusers `ControlNetModel` folder (config.json and weights), or a single
file in the original ControlNet layout (`.safetensors`, `.pth`, `.ckpt`, as the WebUI uses),
converted by diffusers with the configs vlrt ships (`model_configs/controlnet-sd1`, `-sd2`),
SD 1.x and SD 2.x told apart by the cross-attention width in the file's keys; no hub is asked.
A ControlNet whose architecture does not fit the model (cross-attention width, latent channels,
block widths, or a hint encoder that does not downscale by the VAE's factor) is refused with what
was found. LoRAs are fused into the model only, never into its ControlNets. SDXL models take no
ControlNet yet: their units are refused with one line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vlrt.errors import VlrtError
from vlrt.model.checkpoints import CONFIGS, CROSS_ATTENTION, family, read_shapes, read_torch_checkpoint
from vlrt.model.loading import Model
from vlrt.model.lora import file_sha256
from vlrt.settings.controlnet import ControlNetUnit

SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".ckpt")
HINT_KEY = "input_hint_block.0.weight"  # the original layout's control-image encoder
FIRST_ATTENTION = "input_blocks.1.1.transformer_blocks.0" + CROSS_ATTENTION
SHIPPED = {768: CONFIGS / "controlnet-sd1", 1024: CONFIGS / "controlnet-sd2"}


@dataclass
class ControlNet:
    """A unit and its loaded network; `sha256` identifies the weights (the settings file records it)."""

    unit: ControlNetUnit
    network: torch.nn.Module
    sha256: str


def load_controlnets(units: list[ControlNetUnit], model: Model) -> list[ControlNet]:
    """Every unit's ControlNet in float32 on the model's device, in unit order (SD 1.x/2.x models only)."""
    if units and model.is_sdxl:
        raise VlrtError(
            "ControlNet units on an SDXL model are not supported yet (SDXL ControlNets take the pooled embedding "
            "and sizes too): remove the --controlnet units or use an SD 1.x/2.x model"
        )
    return [ControlNet(unit, *_load(Path(unit.model).expanduser(), model)) for unit in units]


def _load(path: Path, model: Model) -> tuple[torch.nn.Module, str]:
    from diffusers import ControlNetModel

    if not path.exists():
        raise VlrtError(
            f"ControlNet model {path} does not exist: give a diffusers ControlNet folder or a .safetensors/.pth file"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise VlrtError(f"ControlNet folder {path} has no config.json: it is not a diffusers ControlNetModel folder")
        _check_config(ControlNetModel.load_config(path), path, model)
        try:
            network = ControlNetModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as exc:
            raise VlrtError(f"ControlNet folder {path} cannot be loaded ({_first_line(exc)}): re-download or re-convert it") from None
        digest = _folder_sha256(path)
    elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        config = _single_file_config(path, model)
        state = read_torch_checkpoint(path) if path.suffix.lower() != ".safetensors" else str(path)
        try:
            network = ControlNetModel.from_single_file(state, config=str(config), local_files_only=True, torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise VlrtError(f"ControlNet file {path} cannot be converted ({_first_line(exc)}): is it a ControlNet?") from None
        _check_config(network.config, path, model)
        digest = file_sha256(path)
    else:
        raise VlrtError(f"ControlNet model {path} is neither a folder nor a .safetensors/.pth/.ckpt file")
    return network.to(model.device).eval(), digest


def _single_file_config(path: Path, model: Model) -> Path:
    """The shipped config for an original-layout ControlNet file, chosen by its keys."""
    shapes = read_shapes(path)
    shapes = {k.removeprefix("control_model."): v for k, v in shapes.items()}
    if HINT_KEY not in shapes:
        raise VlrtError(f"{path} is not a ControlNet in the original layout (no {HINT_KEY}): give a ControlNet model file")
    width = shapes[FIRST_ATTENTION][1] if FIRST_ATTENTION in shapes else None
    if width not in SHIPPED:
        raise VlrtError(
            f"{path} is a ControlNet for {family(width) if width else 'an unknown architecture'}; vlrt converts SD 1.x "
            "and SD 2.x ControlNet files: convert it to a diffusers folder"
        )
    _check_width(width, path, model)
    return SHIPPED[width]


def _check_width(width: int, path: Path, model: Model) -> None:
    if width != model.cross_attention_dim:
        raise VlrtError(
            f"ControlNet {path} is for {family(width)} but the model is {family(model.cross_attention_dim)}: "
            "use a ControlNet made for the model's architecture"
        )


def _check_config(config: dict, path: Path, model: Model) -> None:
    """Refuse a ControlNet that cannot steer this model's UNet, naming what differs."""
    _check_width(int(config["cross_attention_dim"]), path, model)
    unet = model.unet.config
    found = (int(config["in_channels"]), list(config["block_out_channels"]))
    wanted = (int(unet.in_channels), list(unet.block_out_channels))
    if found != wanted:
        raise VlrtError(
            f"ControlNet {path} has {found[0]} latent channels and blocks {found[1]}, the model's UNet {wanted[0]} and "
            f"{wanted[1]}: use a ControlNet made for this model"
        )
    hint_scale = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    if hint_scale != model.vae_scale_factor:
        raise VlrtError(
            f"ControlNet {path} scales control images down by {hint_scale}, the model's VAE by {model.vae_scale_factor}: "
            "use a ControlNet made for this model"
        )


def _folder_sha256(path: Path) -> str:
    """One hash over a folder's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")):
        digest.update(file.name.encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def residual_shapes(model: Model, height: int, width: int) -> list[tuple[int, int, int]]:
    """(channels, h, w) of the UNet's down-block residuals then its mid-block residual at this pixel size:
    conv_in, each resnet layer and each downsampler (none after the last block), then the mid block."""
    config = model.unet.config
    h, w = height // model.vae_scale_factor, width // model.vae_scale_factor
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    shapes = [(channels[0], h, w)]
    for i, (c, n) in enumerate(zip(channels, layers)):
        shapes += [(c, h, w)] * n
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((c, h, w))
    return shapes + [(channels[-1], h, w)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
