"""`--vae`: another VAE in place of the model's (a folder or a single file), checked before it is used.

Accepted: a diffusers VAE folder (`config.json` + weights), a diffusers model folder (its `vae/`),
or a single `.safetensors`/`.ckpt` file in the original layout (with or without the
`first_stage_model.` prefix, as VAEs are shared for SD) or in diffusers' layout; or a tiny
autoencoder (TAESD, `tiny_vae.py`). A single file has no config: it is read with the model's own
VAE config, since SD 1.x, 2.x and SDXL VAEs share one architecture (SDXL's scaling factor, 0.13025,
and its `force_upcast` come with the model's config). Its latent channels must be the UNet's, or
the run would fail deep inside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlrt.errors import VlrtError
from vlrt.model.checkpoints import SUFFIXES, read_shapes, read_torch_checkpoint
from vlrt.model.tiny_vae import is_tiny_vae_spec, load_tiny_vae

DECODER_IN = "decoder.conv_in.weight"  # [channels, latent channels, 3, 3] in both layouts


def load_vae(spec: str, *, model_vae_config: Path, latent_channels: int, dtype: torch.dtype) -> Any:
    """The AutoencoderKL named by `spec`; `model_vae_config` is the model's `vae/` config folder's parent."""
    from diffusers import AutoencoderKL

    if is_tiny_vae_spec(spec):
        return load_tiny_vae(spec, latent_channels=latent_channels, dtype=dtype)
    path = Path(spec).expanduser()
    if not path.exists():
        raise VlrtError(f"VAE {spec} does not exist: pass a diffusers VAE folder or a .safetensors/.ckpt VAE file")
    try:
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            if not (folder / "config.json").is_file():
                raise VlrtError(f"VAE folder {path} has no config.json (nor vae/config.json): it is not a diffusers VAE")
            _check_channels(path, json.loads((folder / "config.json").read_text(encoding="utf-8")).get("latent_channels"), latent_channels)
            return AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
        if path.suffix.lower() not in SUFFIXES:
            raise VlrtError(f"VAE {path} is neither a folder nor a .safetensors/.ckpt file")
        shapes = read_shapes(path)
        decoder_in = [shape for key, shape in shapes.items() if key.endswith(DECODER_IN)]
        if not decoder_in:
            raise VlrtError(f"{path} is not a VAE: it has no {DECODER_IN} (found {len(shapes)} tensors)")
        _check_channels(path, decoder_in[0][1], latent_channels)
        if any(".up_blocks." in key or ".down_blocks." in key for key in shapes):
            return _diffusers_layout_file(path, model_vae_config, dtype)
        return AutoencoderKL.from_single_file(
            str(path), config=str(model_vae_config), subfolder="vae", local_files_only=True, torch_dtype=dtype
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlrtError(f"VAE {path} could not be loaded with the model's VAE architecture: {first}") from None


def _check_channels(path: Path, found: Any, wanted: int) -> None:
    if found != wanted:
        raise VlrtError(
            f"VAE {path} has {found} latent channels but the model's UNet takes {wanted}: use a VAE made for this model"
        )


def _diffusers_layout_file(path: Path, model_vae_config: Path, dtype: torch.dtype) -> Any:
    """A single file holding a diffusers AutoencoderKL's own state dict."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    state = load_file(str(path)) if path.suffix.lower() == ".safetensors" else read_torch_checkpoint(path)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model_vae_config / "vae"))
    vae.load_state_dict(state, strict=True)
    return vae.to(dtype)
