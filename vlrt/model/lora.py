"""`--lora PATH[:SCALE]`: LoRA files fused into the UNet and text encoder before anything runs.

diffusers does the work (`load_lora_weights`, which also reads the kohya/WebUI key format, then
`fuse_lora` and `unload_lora_weights`), on a pipeline made of the model's own modules, one LoRA
after another, each at its scale. Fused weights are plain weights: the engine cache key (a hash
of every weight) changes with each LoRA and scale, and an engine of another scale is re-weighted
rather than exported again (`vlrt.export.reweight`). The scale multiplies the LoRA's delta as the
WebUI's `<lora:name:scale>` does (with the file's alpha/rank factor).

SDXL LoRAs (kohya's `lora_unet_…`, `lora_te1_…`, `lora_te2_…` keys, or diffusers') go into the
UNet and both text encoders, through `StableDiffusionXLPipeline.load_lora_weights`.

A LoRA made for another architecture is refused before loading when its cross-attention keys say
so (their input width is the model family's: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL); otherwise it fails
with diffusers' reason (no module of that name, or a shape mismatch); one none of whose keys reach
a module is refused too.

A prompt's `<lora:NAME:SCALE>` tags name LoRAs too: NAME.safetensors found under `--lora-dir`
(subfolders included, as the WebUI searches its models/Lora). They are fused once for the whole
render like `--lora`, so every prompt of the render must carry the same tags (`untagged_prompt`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlrt.errors import VlrtError
from vlrt.model.checkpoints import family, read_shapes
from vlrt.model.prompt_syntax import LoraTag, split_lora_tags


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> LoraSpec:
        """PATH or PATH:SCALE (the last colon, so that a Windows drive letter stays in the path)."""
        path, sep, scale = spec.rpartition(":")
        if sep:
            try:
                return cls(Path(path).expanduser(), float(scale))
            except ValueError:
                pass
        return cls(Path(spec).expanduser())


def lora_specs(flags: tuple[str, ...], tags: tuple[LoraTag, ...], lora_dir: str) -> list[LoraSpec]:
    """The LoRAs of a render: the `--lora` ones, then those the prompt's tags name; a file named
    both ways is refused (it would be fused twice)."""
    specs = [LoraSpec.parse(flag) for flag in flags]
    for tag in tags:
        spec = LoraSpec(_tagged_file(tag, lora_dir), tag.scale)
        twice = next((s.path for s in specs if s.path.resolve() == spec.path.resolve()), None)
        if twice is not None:
            raise VlrtError(f"LoRA {twice} is given by --lora and by the prompt's {tag}: keep one of them")
        specs.append(spec)
    return specs


def _tagged_file(tag: LoraTag, lora_dir: str) -> Path:
    if not lora_dir:
        raise VlrtError(
            f"the prompt's {tag} needs --lora-dir FOLDER (the folder holding {tag.name}.safetensors, "
            "as the WebUI's models/Lora), or --lora PATH:SCALE in place of the tag"
        )
    folder = Path(lora_dir).expanduser()
    if not folder.is_dir():
        raise VlrtError(f"--lora-dir {folder} is not a folder: name the folder that holds the LoRA files")
    found = sorted(path for path in folder.rglob(f"{tag.name}.safetensors") if path.is_file())
    if not found:
        raise VlrtError(f"the prompt's {tag}: there is no {tag.name}.safetensors in --lora-dir {folder}: check the name or the folder")
    if len(found) > 1:
        raise VlrtError(f"the prompt's {tag} matches both {found[0]} and {found[1]}: rename or move one of them")
    return found[0]


def untagged_prompt(prompt: str, fused: tuple[LoraTag, ...]) -> str:
    """The prompt without its `<lora:…>` tags, which must be those the render fused."""
    text, tags = split_lora_tags(prompt)
    if sorted(tags, key=str) != sorted(fused, key=str):
        asked = " ".join(map(str, tags)) or "no <lora:…> tag"
        have = " ".join(map(str, fused)) or "none"
        raise VlrtError(
            f"the prompt {_excerpt(prompt)} asks for {asked} but the render fused {have} (the tags of --prompt): "
            "LoRAs are fused once per render, so every prompt (schedules, prompt files) must carry the same tags"
        )
    return text


def _excerpt(prompt: str) -> str:
    return repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CROSS_ATTENTION_KEYS = ("attn2_to_k.lora_down.weight", "attn2.to_k.lora_down.weight", "attn2.to_k.lora_A.weight")


def lora_width(path: Path) -> int | None:
    """The cross-attention width a LoRA was trained for (the input size of its attn2 key projections), if it has any."""
    for key, shape in read_shapes(path).items():
        if key.endswith(CROSS_ATTENTION_KEYS) and "unet" in key and len(shape) == 2:
            return int(shape[1])
    return None


def _check_family(path: Path, width: int) -> None:
    found = lora_width(path)
    if found is not None and found != width:
        raise VlrtError(
            f"LoRA {path} is for {family(found)} but the model is {family(width)}: use a LoRA made for this model's architecture"
        )


def apply_loras(modules: dict[str, Any], scheduler_config: dict[str, Any], specs: list[LoraSpec]) -> list[dict[str, Any]]:
    """Fuse each LoRA into `modules` (unet, vae, text_encoder(s), tokenizer(s)) in place; what was applied, with file hashes."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if not specs:
        return []
    scheduler = PNDMScheduler.from_config(scheduler_config)
    if "text_encoder_2" in modules:
        pipe = StableDiffusionXLPipeline(**modules, scheduler=scheduler, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(
            **modules, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    applied = []
    for i, spec in enumerate(specs):
        if not spec.path.is_file():
            raise VlrtError(f"LoRA {spec.path} does not exist: check the --lora path")
        _check_family(spec.path, int(modules["unet"].config.cross_attention_dim))
        name = f"lora{i}"
        try:
            pipe.load_lora_weights(str(spec.path), adapter_name=name)
        except Exception as exc:  # diffusers and peft raise ValueError, RuntimeError, their own errors
            raise VlrtError(f"LoRA {spec.path} does not fit this model ({_first_line(exc)}): use a LoRA made for it") from None
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise VlrtError(f"LoRA {spec.path} does not fit this model: none of its keys names a module of it")
        with torch.no_grad():
            pipe.fuse_lora(lora_scale=spec.scale, adapter_names=[name])
        pipe.unload_lora_weights()
        applied.append({"path": str(spec.path), "scale": spec.scale, "sha256": file_sha256(spec.path)})
    return applied


def _first_line(exc: BaseException) -> str:
    """The reason on one line; a heading that ends in ':' keeps its first item (the size mismatch)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."
