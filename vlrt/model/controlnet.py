"""Loading the ControlNet of each unit, checked against the model it will steer.

A unit's `model` is a diffusers `ControlNetModel` folder (config.json and weights), or a single file
(`.safetensors`, `.pth`, `.ckpt`) in either of the two key layouts ControlNets are shipped in:
diffusers' own (`controlnet_cond_embedding.…`, `down_blocks.…`, `controlnet_down_blocks.…`: most SDXL
ControlNets, the WebUI's `diffusers_xl_*` files, xinsir's) or the original ControlNet layout
(`input_hint_block.…`, `input_blocks.…`, `zero_convs.…`, with `label_emb` on SDXL; under `control_model.`
or bare, as ControlNet 1.0's and 1.1's files have them). An original-layout file's keys are renamed to
diffusers' (`diffusers_layout`), so both layouts are read one way, offline. Written here rather than
taken from diffusers' `ControlNetModel.from_single_file`: that converter drops an SDXL ControlNet's
`label_emb` (the load then fails or leaves those layers random) and reads no diffusers-layout file. The
keys' shapes give the architecture (`controlnet_structure`: block widths, layers, transformer depths,
0 or none in the "mid" and "small" SDXL ControlNets, projections, control-image encoder, SDXL's added
conditioning). A file of SD 1.x's or SD 2.x's shipped ControlNet architecture takes the config vlrt ships
(`model_configs/controlnet-sd1`, `-sd2`); any other (SDXL, a fine-tune of another size, the tests' tiny
ones) takes its keys' structure and, for what keys cannot show (attention heads, normalisation groups), the
model's UNet's values: a ControlNet is a copy of the encoder of the UNet it steers. The network is built
without weights and the file's loaded into it with every key matched: a missing, extra or misshapen weight
is refused in one line naming the file.
SDXL models take SDXL ControlNets (`addition_embed_type="text_time"`), which take the UNet's pooled
embedding and six sizes (`vlrt.engines.base.SDXL_CONDITIONING`) row by row as the UNet does.
A ControlNet whose architecture does not fit the model (its family, checked first from the keys that say it:
SDXL by its added conditioning, the others by cross-attention width; latent channels, block widths, the added
conditioning's size, or a hint encoder that does not downscale by the VAE's factor) is refused with what was
found. LoRAs are fused into the model only, never into its ControlNets.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlrt.errors import VlrtError
from vlrt.model.checkpoints import CONFIGS, CROSS_ATTENTION, KNOWN_WIDTHS, family, read_shapes, read_torch_checkpoint
from vlrt.model.loading import Model
from vlrt.model.lora import file_sha256
from vlrt.settings.controlnet import ControlNetUnit

SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".ckpt")
CONTROL_PREFIX = "control_model."  # ControlNet 1.0 files; 1.1's keys have no prefix
HINT_KEY = "input_hint_block.0.weight"  # the original layout's control-image encoder
DIFFUSERS_HINT_KEY = "controlnet_cond_embedding.conv_in.weight"  # the same in diffusers' layout
SDXL_EMBEDDING = "text_time"  # an SDXL ControlNet's addition_embed_type: the pooled embedding and the six sizes
SDXL_ADD_EMBEDDING = "add_embedding.linear_1.weight"  # that embedding's first layer (label_emb.0.0 in the original layout)
# Original-layout names whose diffusers names are a plain prefix swap.
ORIGINAL_PREFIXES = {
    "time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
    "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.", "middle_block_out.0.": "controlnet_mid_block.", "middle_block.1.": "mid_block.attentions.0.",
}
# An original ResNet layer's parts by their diffusers names.
ORIGINAL_RESNET = {
    "in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut.",
}
SHIPPED = {768: CONFIGS / "controlnet-sd1", 1024: CONFIGS / "controlnet-sd2"}
# What a ControlNet file's keys do not show, taken from the model's UNet when its config is not a shipped one
# (the cross-attention width too, for a ControlNet without cross-attention).
FROM_UNET = (
    "attention_head_dim", "num_attention_heads", "norm_num_groups", "norm_eps", "act_fn", "flip_sin_to_cos", "freq_shift",
    "downsample_padding", "mid_block_scale_factor", "upcast_attention", "resnet_time_scale_shift", "only_cross_attention",
    "addition_time_embed_dim", "cross_attention_dim",
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
        network = _load_single_file(path, model)
        digest = file_sha256(path)
    else:
        raise VlrtError(f"ControlNet model {path} is neither a folder nor a .safetensors/.pth/.ckpt file")
    return network.to(model.device).eval(), digest


def _load_single_file(path: Path, model: Model) -> torch.nn.Module:
    """A single ControlNet file, either layout, as a ControlNetModel: its config from its keys' shapes (and the
    UNet's), checked against the model, then the weights loaded into a network built without weights of its own,
    every key matched, so nothing is random and nothing is left out."""
    from diffusers import ControlNetModel

    shapes = diffusers_layout(read_shapes(path), path)
    config = single_file_config(shapes, path, model)
    with torch.device("meta"):
        network = ControlNetModel.from_config(config)
    _check_keys(shapes, {k: tuple(v.shape) for k, v in network.state_dict().items()}, path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = {k: v for k, v in read_torch_checkpoint(path).items() if isinstance(v, torch.Tensor)}
    state = diffusers_layout(state, path)
    network.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    return network


def diffusers_layout(entries: dict[str, Any], path: Path) -> dict[str, Any]:
    """A single ControlNet file's entries (shapes or tensors) under diffusers' names: a diffusers-layout file's as
    they are; an original-layout file's (ControlNet 1.0's under control_model., beside the SD model of its full
    files; 1.1's bare; SDXL's with label_emb) renamed, so both layouts are read and loaded one way."""
    if DIFFUSERS_HINT_KEY in entries:
        return entries
    if any(k.startswith(CONTROL_PREFIX) for k in entries):
        entries = {k.removeprefix(CONTROL_PREFIX): v for k, v in entries.items() if k.startswith(CONTROL_PREFIX)}
    if HINT_KEY not in entries:
        raise VlrtError(
            f"{path} is not a ControlNet file (neither diffusers' {DIFFUSERS_HINT_KEY} nor the original layout's "
            f"{HINT_KEY}): give a ControlNet model file"
        )
    blocks = {int(k.split(".")[1]) for k in entries if k.startswith("input_blocks.")}
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in entries]
    per_level = min(downsamplers) if downsamplers else max(blocks, default=0) + 1  # the layers of a level and its downsampler
    hint_out = max(int(k.split(".")[1]) for k in entries if k.startswith("input_hint_block."))
    return {_diffusers_name(k, per_level, hint_out): v for k, v in entries.items()}


def _diffusers_name(key: str, per_level: int, hint_out: int) -> str:
    """One original-layout ControlNet key's diffusers name; a key of no known part keeps its name, so that
    loading names it as one the architecture does not take."""
    for old, new in ORIGINAL_PREFIXES.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    parts = key.split(".")
    if parts[0] == "middle_block" and parts[1] in ("0", "2"):
        return f"mid_block.resnets.{int(parts[1]) // 2}." + _resnet_part(".".join(parts[2:]))
    if parts[0] == "zero_convs":
        return f"controlnet_down_blocks.{parts[1]}." + ".".join(parts[3:])
    if parts[0] == "input_hint_block":
        index = int(parts[1])
        layer = "conv_in" if index == 0 else "conv_out" if index == hint_out else f"blocks.{index // 2 - 1}"
        return f"controlnet_cond_embedding.{layer}." + ".".join(parts[2:])
    if parts[0] == "input_blocks":
        level, layer = divmod(int(parts[1]) - 1, per_level)
        rest = ".".join(parts[3:])
        if parts[2:4] == ["0", "op"]:
            return f"down_blocks.{level}.downsamplers.0.conv." + ".".join(parts[4:])
        if parts[2] == "0":
            return f"down_blocks.{level}.resnets.{layer}." + _resnet_part(rest)
        return f"down_blocks.{level}.attentions.{layer}.{rest}"
    return key


def _resnet_part(rest: str) -> str:
    for old, new in ORIGINAL_RESNET.items():
        if rest.startswith(old):
            return new + rest.removeprefix(old)
    return rest


@dataclass(frozen=True)
class ControlNetStructure:
    """What a ControlNet file's keys say, in diffusers' config names: its structure, and the shipped config folder
    when the structure is that config's."""

    structure: dict
    shipped: Path | None

    @property
    def width(self) -> int | None:
        return self.structure.get("cross_attention_dim")

    @property
    def sdxl(self) -> bool:
        return self.structure["addition_embed_type"] == SDXL_EMBEDDING


def controlnet_structure(shapes: dict[str, tuple[int, ...]], path: Path) -> ControlNetStructure:
    """Read a ControlNet's architecture from its keys' names and shapes (diffusers' names: `diffusers_layout`)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise VlrtError(f"ControlNet file {path} lacks {key}, which its architecture needs: is the file complete?")
        return shapes[key]

    def ids(prefix: str) -> set[int]:
        return {int(k.removeprefix(prefix).split(".")[0]) for k in shapes if k.startswith(prefix)}

    def depth(attention: str) -> int:  # a Transformer2DModel's layers; 0 in the small SDXL ControlNets
        return len(ids(f"{attention}.transformer_blocks."))

    levels = sorted(ids("down_blocks."))
    if not levels:
        raise VlrtError(f"ControlNet file {path} has no down blocks: is the file complete?")
    layers = [len(ids(f"down_blocks.{i}.resnets.")) for i in levels]
    if len(set(layers)) != 1:
        raise VlrtError(f"{path} has levels of {layers} layers: vlrt loads ControlNets with equal levels")
    attended = [bool(ids(f"down_blocks.{i}.attentions.")) for i in levels]
    mid_attended = bool(ids("mid_block.attentions."))
    # diffusers gives the mid block the last level's depth: a level without attention takes the mid block's
    # (a mid block of another depth than an attended last level's is not buildable, and its keys will not match).
    mid = depth("mid_block.attentions.0") if mid_attended else 1
    depths = [depth(f"down_blocks.{i}.attentions.0") if a else mid for i, a in zip(levels, attended)]
    hint_blocks = sorted(ids("controlnet_cond_embedding.blocks."))
    projections = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    structure = {
        "in_channels": shape("conv_in.weight")[1],
        "conditioning_channels": shape(DIFFUSERS_HINT_KEY)[1],
        "block_out_channels": [shape(f"down_blocks.{i}.resnets.0.conv2.weight")[0] for i in levels],
        "layers_per_block": layers[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attended],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_attended else "UNetMidBlock2D",
        "use_linear_projection": bool(projections) and len(projections[0]) == 2,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "conditioning_embedding_out_channels": [
            shape(DIFFUSERS_HINT_KEY)[0], *(shape(f"controlnet_cond_embedding.blocks.{j}.weight")[0] for j in hint_blocks[1::2])
        ],
        "addition_embed_type": SDXL_EMBEDDING if SDXL_ADD_EMBEDDING in shapes else None,
        "projection_class_embeddings_input_dim": shapes[SDXL_ADD_EMBEDDING][1] if SDXL_ADD_EMBEDDING in shapes else None,
    }
    width = cross_attention_width(shapes, path)
    if width is not None:
        structure["cross_attention_dim"] = width
    shipped = SHIPPED.get(width) if structure["addition_embed_type"] is None else None
    if shipped is not None:
        config = _full_config(json.loads((shipped / "config.json").read_text(encoding="utf-8")))
        if any(_plain(config[k]) != _plain(v) for k, v in structure.items()):
            shipped = None
    return ControlNetStructure(structure, shipped)


def cross_attention_width(shapes: dict[str, tuple[int, ...]], path: Path) -> int | None:
    """The cross-attention width of a ControlNet file in diffusers' names (768 for SD 1.x, 1024 for SD 2.x, 2048
    for SDXL); None for one without cross-attention, whose width does not matter."""
    widths = {s[1] for k, s in shapes.items() if k.startswith(("down_blocks.", "mid_block.")) and k.endswith(CROSS_ATTENTION)}
    if len(widths) > 1:
        raise VlrtError(f"{path} is a ControlNet without one cross-attention width ({sorted(widths)}): vlrt cannot tell its architecture")
    return widths.pop() if widths else None


def single_file_config(shapes: dict[str, tuple[int, ...]], path: Path, model: Model) -> dict:
    """The ControlNetModel config of a single file's keys (diffusers' names): the shipped config for a file it
    fits; else the structure of its keys over the model's UNet's heads and norms. Refuses a ControlNet of another
    family first (from the keys that say it), then one that cannot steer the model, before any weight is read."""
    width = cross_attention_width(shapes, path)
    _check_family(SDXL_ADD_EMBEDDING in shapes, model.cross_attention_dim if width is None else width, path, model)
    found = controlnet_structure(shapes, path)
    if found.shipped is not None:
        config = json.loads((found.shipped / "config.json").read_text(encoding="utf-8"))
    else:
        unet = dict(model.unet.config)
        config = {**{k: unet[k] for k in FROM_UNET if k in unet}, **found.structure}
    config = _full_config(config)
    _check_config(config, path, model)
    return config


def _check_keys(found: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse a file whose weights are not exactly those of the architecture its keys gave, in one line."""
    missing, extra = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
    if missing:
        raise VlrtError(
            f"ControlNet file {path} lacks {len(missing)} weights its architecture needs ({', '.join(missing[:3])}"
            f"{', …' if len(missing) > 3 else ''}): is the file complete?"
        )
    if extra:
        raise VlrtError(
            f"ControlNet file {path} has {len(extra)} weights a ControlNet does not ({', '.join(extra[:3])}"
            f"{', …' if len(extra) > 3 else ''}): it is another network (ControlNet-Union, Control-LoRA, T2I-Adapter?); "
            "give a plain ControlNet"
        )
    wrong = [k for k in wanted if tuple(found[k]) != wanted[k]]
    if wrong:
        raise VlrtError(
            f"ControlNet file {path}'s {wrong[0]} is {tuple(found[wrong[0]])}, its architecture's {wanted[wrong[0]]}: "
            "it is not a ControlNet vlrt can read"
        )


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
    if model.is_inpainting:
        raise VlrtError(
            f"ControlNet {path} cannot steer an inpainting model (9-channel UNet) in vlrt yet: use the model's "
            "ordinary version with ControlNet, or the inpainting model without it"
        )
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
