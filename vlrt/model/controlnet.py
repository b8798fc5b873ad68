"""Loading the ControlNet of each unit, checked against the model it will steer.

A unit's `model` is a diffusers `ControlNetModel` folder (config.json and weights), or a single
file in the original ControlNet layout (`.safetensors`, `.pth`, `.ckpt`, as the WebUI uses; its
keys under `control_model.` or bare, as ControlNet 1.1's files have them), converted by diffusers'
`ControlNetModel.from_single_file` with the configs vlrt ships (`model_configs/controlnet-sd1`,
`-sd2`); no hub is asked. The file's keys say its architecture before anything is converted
(`original_structure`): SD 1.x and SD 2.x are told apart by the cross-attention width (768 / 1024),
and the shipped config is used when the keys' block widths, layers, attention levels, projections
and control-image encoder are its own. Any other ControlNet file (a fine-tune of another size, the
tests' tiny ones) is converted with the structure its keys give and, for what keys cannot show
(attention heads, normalisation groups), the model's UNet's values: a ControlNet is a copy of the
encoder of the UNet it steers.
SDXL models take SDXL ControlNets: diffusers folders whose config has `addition_embed_type="text_time"`
(diffusers/controlnet-canny-sdxl-1.0's layout), which take the UNet's pooled embedding and six sizes
(`vlrt.engines.base.SDXL_CONDITIONING`) row by row as the UNet does. A single SDXL ControlNet file in
the original layout is refused with one line: diffusers' converter leaves out its pooled-embedding and
size layers (`label_emb`), so only its diffusers folder loads.
A ControlNet whose architecture does not fit the model (its family: SDXL by its added conditioning, the
others by cross-attention width; latent channels, block widths, the added conditioning's size, or a hint
encoder that does not downscale by the VAE's factor) is refused with what was found. LoRAs are fused
into the model only, never into its ControlNets.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlrt.errors import VlrtError
from vlrt.model.checkpoints import CONFIGS, CROSS_ATTENTION, KNOWN_WIDTHS, family, read_shapes, read_torch_checkpoint
from vlrt.model.loading import Model
from vlrt.model.lora import file_sha256
from vlrt.settings.controlnet import ControlNetUnit

SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".ckpt")
CONTROL_PREFIX = "control_model."  # ControlNet 1.0 files; 1.1's keys have no prefix
HINT_KEY = "input_hint_block.0.weight"  # the original layout's control-image encoder
CONV_IN = "input_blocks.0.0.weight"
HINT_CONV_OUT = 14  # diffusers' converter reads the encoder's last convolution at input_hint_block.14
SDXL_EMBEDDING = "text_time"  # an SDXL ControlNet's addition_embed_type: the pooled embedding and the six sizes
SDXL_ADD_EMBEDDING = "label_emb.0.0.weight"  # that embedding's first layer in the original layout
SHIPPED = {768: CONFIGS / "controlnet-sd1", 1024: CONFIGS / "controlnet-sd2"}
# What an original-layout file's keys do not show, taken from the model's UNet when its config is not a shipped one.
FROM_UNET = (
    "attention_head_dim", "num_attention_heads", "norm_num_groups", "norm_eps", "act_fn", "flip_sin_to_cos", "freq_shift",
    "downsample_padding", "mid_block_scale_factor", "upcast_attention", "resnet_time_scale_shift", "only_cross_attention",
)


@dataclass
class ControlNet:
    """A unit and its loaded network; `sha256` identifies the weights (the settings file records it)."""

    unit: ControlNetUnit
    network: torch.nn.Module
    sha256: str


def load_controlnets(units: list[ControlNetUnit], model: Model) -> list[ControlNet]:
    """Every unit's ControlNet in float32 on the model's device, in unit order."""
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
        folder, overrides = single_file_config(read_shapes(path), path, model)
        state = read_torch_checkpoint(path) if path.suffix.lower() != ".safetensors" else str(path)
        try:
            network = ControlNetModel.from_single_file(
                state, config=str(folder), local_files_only=True, torch_dtype=torch.float32, **overrides
            )
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise VlrtError(f"ControlNet file {path} cannot be converted ({_first_line(exc)}): is it a ControlNet?") from None
        if any(p.device.type == "meta" for p in network.parameters()):
            raise VlrtError(f"ControlNet file {path} lacks weights its architecture needs: is the file complete?")
        _check_config(network.config, path, model)
        digest = file_sha256(path)
    else:
        raise VlrtError(f"ControlNet model {path} is neither a folder nor a .safetensors/.pth/.ckpt file")
    return network.to(model.device).eval(), digest


@dataclass(frozen=True)
class OriginalControlNet:
    """What an original-layout ControlNet file's keys say: its structure in diffusers' config names,
    its family, and the shipped config folder when the structure is that config's."""

    structure: dict
    shipped: Path | None

    @property
    def width(self) -> int:
        return self.structure["cross_attention_dim"]

    @property
    def family(self) -> str:
        return family(self.width)


def original_structure(shapes: dict[str, tuple[int, ...]], path: Path) -> OriginalControlNet:
    """Read an original-layout ControlNet's architecture from its keys' names and shapes."""
    width = cross_attention_width(shapes, path)
    shapes = {k.removeprefix(CONTROL_PREFIX): v for k, v in shapes.items()}
    if CONV_IN not in shapes:
        raise VlrtError(f"{path} is a ControlNet without its first convolution ({CONV_IN}): is the file complete?")
    levels: list[list[tuple[int, int]]] = [[]]  # per resolution level: (channels, transformer depth) of each layer
    for i in sorted({int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")} - {0}):
        if f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
            continue
        out = shapes.get(f"input_blocks.{i}.0.out_layers.3.weight")
        if out is None:
            raise VlrtError(f"{path}: input block {i} is neither a ResNet layer nor a downsampler: it is not a ControlNet vlrt knows")
        depth = len({k.split(".")[4] for k in shapes if k.startswith(f"input_blocks.{i}.1.transformer_blocks.")})
        levels[-1].append((out[0], depth))
    counts = {len(level) for level in levels}
    if len(counts) != 1 or not levels[0]:
        raise VlrtError(f"{path} has levels of {[len(level) for level in levels]} layers: vlrt converts ControlNets with equal levels")
    depths = [max(d for _, d in level) or 1 for level in levels]
    projections = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    hint = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.") and k.endswith(".weight"))
    if hint[-1] != HINT_CONV_OUT:
        raise VlrtError(
            f"{path}'s control-image encoder has {len(hint)} convolutions, the original ControlNet's 8: convert it to a diffusers folder"
        )
    outs = [shapes[f"input_hint_block.{j}.weight"][0] for j in hint]
    structure = {
        "in_channels": shapes[CONV_IN][1],
        "conditioning_channels": shapes[HINT_KEY][1],
        "block_out_channels": [level[0][0] for level in levels],
        "layers_per_block": counts.pop(),
        "down_block_types": ["CrossAttnDownBlock2D" if any(d for _, d in level) else "DownBlock2D" for level in levels],
        "cross_attention_dim": width,
        "use_linear_projection": bool(projections) and len(projections[0]) == 2,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "conditioning_embedding_out_channels": [outs[0], *outs[2:-1:2]],
    }
    shipped = SHIPPED.get(structure["cross_attention_dim"])
    if shipped is not None:
        config = _full_config(json.loads((shipped / "config.json").read_text(encoding="utf-8")))
        if any(_plain(config[k]) != _plain(v) for k, v in structure.items()):
            shipped = None
    return OriginalControlNet(structure, shipped)


def cross_attention_width(shapes: dict[str, tuple[int, ...]], path: Path) -> int:
    """The cross-attention width of an original-layout ControlNet file: 768 for SD 1.x, 1024 for SD 2.x."""
    shapes = {k.removeprefix(CONTROL_PREFIX): v for k, v in shapes.items()}
    if HINT_KEY not in shapes:
        raise VlrtError(f"{path} is not a ControlNet in the original layout (no {HINT_KEY}): give a ControlNet model file")
    widths = {s[1] for k, s in shapes.items() if k.startswith(("input_blocks.", "middle_block.")) and k.endswith(CROSS_ATTENTION)}
    if len(widths) != 1:
        raise VlrtError(f"{path} is a ControlNet without one cross-attention width ({sorted(widths)}): vlrt cannot tell its architecture")
    return widths.pop()


def single_file_config(shapes: dict[str, tuple[int, ...]], path: Path, model: Model) -> tuple[Path, dict]:
    """The config folder for `from_single_file` and the values that override it: none for a file the
    shipped config fits; else the structure of its keys and the model's UNet's heads and norms. Refuses a
    ControlNet that cannot steer the model before converting anything."""
    sdxl = any(k.removeprefix(CONTROL_PREFIX) == SDXL_ADD_EMBEDDING for k in shapes)
    _check_family(sdxl, cross_attention_width(shapes, path), path, model)
    if sdxl:
        raise VlrtError(
            f"ControlNet file {path} is an SDXL ControlNet in the original layout, which diffusers' converter cannot "
            "read offline (it leaves out the pooled-embedding and size layers, label_emb): use the ControlNet's "
            "diffusers folder (config.json and diffusion_pytorch_model.safetensors)"
        )
    found = original_structure(shapes, path)
    if found.shipped is not None:
        folder, overrides = found.shipped, {}
    else:
        unet = dict(model.unet.config)
        folder = SHIPPED[768]
        overrides = {**{k: unet[k] for k in FROM_UNET if k in unet}, **found.structure}
    config = _full_config({**json.loads((folder / "config.json").read_text(encoding="utf-8")), **overrides})
    _check_config(config, path, model)
    return folder, overrides


def _full_config(config: dict) -> dict:
    """A ControlNetModel config with its defaults filled in."""
    from diffusers import ControlNetModel

    parameters = inspect.signature(ControlNetModel.__init__).parameters.values()
    return {**{p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}, **config}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _family(sdxl: bool, width: int) -> str:
    """A ControlNet's or a model's family in words: SDXL by its added conditioning (pooled embedding and
    sizes), which tiny and fine-tuned SDXLs have at any width; the others by their cross-attention width."""
    if sdxl:
        return f"SDXL (cross-attention width {width})"
    return family(width) if width in (KNOWN_WIDTHS["clip"], KNOWN_WIDTHS["open_clip"]) else f"SD 1.x/2.x (cross-attention width {width})"


def _check_family(sdxl: bool, width: int, path: Path, model: Model) -> None:
    """Refuse a ControlNet of another family than the model's: an SD 1.x/2.x ControlNet on SDXL, an
    SDXL one on SD 1.x/2.x, SD 1.x on SD 2.x and the reverse."""
    if (sdxl, width) != (model.is_sdxl, model.cross_attention_dim):
        wanted = "an SDXL ControlNet" if model.is_sdxl else "a ControlNet made for the model's architecture"
        raise VlrtError(
            f"ControlNet {path} is for {_family(sdxl, width)} but the model is "
            f"{_family(model.is_sdxl, model.cross_attention_dim)}: use {wanted}, or a model of the ControlNet's family"
        )


def _check_config(config: dict, path: Path, model: Model) -> None:
    """Refuse a ControlNet that cannot steer this model's UNet, naming what differs."""
    sdxl = config.get("addition_embed_type") == SDXL_EMBEDDING
    _check_family(sdxl, int(config["cross_attention_dim"]), path, model)
    unet = model.unet.config
    found = (int(config["in_channels"]), list(config["block_out_channels"]))
    wanted = (int(unet.in_channels), list(unet.block_out_channels))
    if found != wanted:
        raise VlrtError(
            f"ControlNet {path} has {found[0]} latent channels and blocks {found[1]}, the model's UNet {wanted[0]} and "
            f"{wanted[1]}: use a ControlNet made for this model"
        )
    if sdxl:
        found = (int(config["projection_class_embeddings_input_dim"]), int(config["addition_time_embed_dim"]))
        wanted = (int(unet.projection_class_embeddings_input_dim), int(unet.addition_time_embed_dim))
        if found != wanted:
            raise VlrtError(
                f"ControlNet {path} takes {found[0]} numbers of added conditioning ({found[1]} per size), the model's "
                f"UNet {wanted[0]} ({wanted[1]} per size): use a ControlNet made for this model"
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
