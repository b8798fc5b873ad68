"""`--lora PATH[:SCALE]`: LoRA files fused into the UNet and text encoder before anything runs.

diffusers does the work (`load_lora_weights`, which also reads the kohya/WebUI key format, then
`fuse_lora` and `unload_lora_weights`), on a pipeline made of the model's own modules, one LoRA
after another, each at its scale. Fused weights are plain weights: the engine cache key (a hash
of every weight) changes with each LoRA and scale, and an engine of another scale is re-weighted
rather than exported again (`vlrt.export.reweight`). The scale multiplies the LoRA's delta as the
WebUI's `<lora:name:scale>` does (with the file's alpha/rank factor).

A LoRA made for another architecture fails with diffusers' reason (no module of that name, or a
shape mismatch); one none of whose keys reach a module is refused too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlrt.errors import VlrtError


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def apply_loras(modules: dict[str, Any], scheduler_config: dict[str, Any], specs: list[LoraSpec]) -> list[dict[str, Any]]:
    """Fuse each LoRA into `modules` (unet, vae, text_encoder, tokenizer) in place; what was applied, with file hashes."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    if not specs:
        return []
    pipe = StableDiffusionPipeline(
        **modules, scheduler=PNDMScheduler.from_config(scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    applied = []
    for i, spec in enumerate(specs):
        if not spec.path.is_file():
            raise VlrtError(f"LoRA {spec.path} does not exist: check the --lora path")
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
