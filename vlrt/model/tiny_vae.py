"""`--vae` with a tiny autoencoder (TAESD for SD 1.x/2.x, TAESDXL for SDXL) as diffusers' `AutoencoderTiny`.

Why: at 512×512 the full SD VAE costs more than four UNet evaluations a frame (ANCHORS.md), so with
few-step models it is most of a frame's cost; TAESD's encoder and decoder cost about a tenth of it.

Accepted forms:
- a diffusers `AutoencoderTiny` folder (`config.json` whose `_class_name` is `AutoencoderTiny`, or a
  model folder whose `vae/` is one);
- TAESD's original pair of files, `ENCODER,DECODER` (`taesd_encoder.pth,taesd_decoder.pth`, or the
  `.safetensors` copies), or a folder holding one file with `encoder` in its name and one with `decoder`.

The original files hold the `nn.Sequential` state dicts of TAESD's encoder and decoder. diffusers'
`EncoderTiny.layers` is the same sequence, index for index; `DecoderTiny` computes TAESD's leading
clamp (`tanh(x / 3) * 3`) outside its `layers`, so decoder index k is diffusers' k − 1. The config
(channels, blocks per stage, latent channels) is read from the tensors' shapes, so TAESD, TAESDXL and
smaller variants all load. The latents are used as diffusers' pipelines use an `AutoencoderTiny`'s:
the encoder's output as it is (no posterior to sample), scaling factor 1.0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from vlrt.errors import VlrtError
from vlrt.model.checkpoints import read_shapes, read_torch_checkpoint

TINY_CLASS = "AutoencoderTiny"
HALF_SUFFIXES = (".pth", ".safetensors")
PAIR_HINT = "pass both: --vae taesd_encoder.pth,taesd_decoder.pth, or a folder holding the two files"
_LAYER = re.compile(r"^(\d+)\.(.+)$")


def is_tiny_vae_spec(spec: str) -> bool:
    """Whether a --vae value names a tiny autoencoder (or half of TAESD's pair, which `load_tiny_vae` refuses)."""
    path = Path(spec).expanduser()
    if not path.exists():
        return "," in spec
    if path.is_dir():
        config = _config_file(path)
        if config is not None:
            return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == TINY_CLASS
        return bool(_halves(path))
    if path.suffix.lower() == ".pth":
        return True
    return path.suffix.lower() == ".safetensors" and _is_sequential(read_shapes(path))


def load_tiny_vae(spec: str, *, latent_channels: int, dtype: torch.dtype) -> Any:
    """The `AutoencoderTiny` a --vae value names, its latent channels checked against the UNet's."""
    from diffusers import AutoencoderTiny

    path = Path(spec).expanduser()
    config = _config_file(path) if path.is_dir() else None
    if config is not None:
        _check_channels(spec, json.loads(config.read_text(encoding="utf-8")).get("latent_channels", 4), latent_channels)
        try:
            return AutoencoderTiny.from_pretrained(config.parent, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise VlrtError(f"tiny VAE folder {config.parent} could not be loaded: {_first_line(exc)}") from None
    encoder_file, decoder_file = _pair(spec, path)
    encoder, decoder = _state(encoder_file), _state(decoder_file)
    for file, state, want in ((encoder_file, encoder, "encoder"), (decoder_file, decoder, "decoder")):
        if not _is_sequential(state) or _half_of(state) != want:
            raise VlrtError(f"{file} is not TAESD's {want} file (its keys are not the original layout's): {PAIR_HINT}")
    shapes = _config_from_shapes(encoder, decoder)
    _check_channels(spec, shapes["latent_channels"], latent_channels)
    vae = AutoencoderTiny(**shapes)
    weights = {f"encoder.layers.{k}": v for k, v in encoder.items()}
    for key, value in decoder.items():
        index, rest = _LAYER.match(key).groups()
        weights[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    try:
        vae.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise VlrtError(f"TAESD files {encoder_file} and {decoder_file} do not make one tiny VAE: {_first_line(exc)}") from None
    return vae.to(dtype)


def _config_file(folder: Path) -> Path | None:
    for candidate in (folder / "vae" / "config.json", folder / "config.json"):
        if candidate.is_file():
            return candidate
    return None


def _halves(folder: Path) -> dict[str, Path]:
    """The folder's TAESD files by half ('encoder', 'decoder'), .safetensors preferred over .pth."""
    found: dict[str, Path] = {}
    for file in sorted(folder.iterdir(), key=lambda p: (p.suffix != ".safetensors", p.name)):
        if file.is_file() and file.suffix.lower() in HALF_SUFFIXES:
            for half in ("encoder", "decoder"):
                if half in file.name.lower():
                    found.setdefault(half, file)
    return found


def _pair(spec: str, path: Path) -> tuple[Path, Path]:
    """(encoder file, decoder file) of a pair given as `A,B` or as a folder; one half alone is refused."""
    if path.is_dir():
        halves = _halves(path)
        if len(halves) < 2:
            have = next(iter(halves.values()))
            raise VlrtError(f"--vae {spec} holds only TAESD's {_half_of(_state(have))} ({have.name}): {PAIR_HINT}")
        return halves["encoder"], halves["decoder"]
    if path.exists():
        raise VlrtError(f"--vae {spec} is only TAESD's {_half_of(_state(path))}: {PAIR_HINT}")
    files = [Path(part.strip()).expanduser() for part in spec.split(",")]
    if len(files) != 2:
        raise VlrtError(f"--vae {spec}: a TAESD pair is two files separated by one comma ({PAIR_HINT})")
    for file in files:
        if not file.is_file():
            raise VlrtError(f"TAESD file {file} does not exist: {PAIR_HINT}")
    first, second = files
    return (first, second) if _half_of(_state(first)) == "encoder" else (second, first)


def _state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (OSError, ValueError) as exc:
            raise VlrtError(f"{path} is not a readable .safetensors file ({_first_line(exc)})") from None
    return {k: v for k, v in read_torch_checkpoint(path).items() if isinstance(v, torch.Tensor)}


def _is_sequential(state: dict[str, Any]) -> bool:
    """TAESD's original layout: every key is `<layer index>.<name>`."""
    return bool(state) and all(_LAYER.match(k) for k in state)


def _half_of(state: dict[str, torch.Tensor]) -> str:
    """TAESD's encoder starts with a convolution at index 0; its decoder with a clamp there (no weights)."""
    return "encoder" if "0.weight" in state else "decoder"


def _layers(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Each weighted layer in order: ('conv', weight) or ('block', its first convolution's weight)."""
    indices = sorted({int(_LAYER.match(k).group(1)) for k in state})
    layers = []
    for i in indices:
        if f"{i}.conv.0.weight" in state:
            layers.append(("block", state[f"{i}.conv.0.weight"]))
        elif f"{i}.weight" in state:
            layers.append(("conv", state[f"{i}.weight"]))
    return layers


def _config_from_shapes(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]) -> dict[str, Any]:
    """AutoencoderTiny's config from the tensors: a stage is a convolution followed by its blocks."""
    enc, dec = _layers(encoder), _layers(decoder)
    enc_channels, enc_blocks = [], []
    for kind, weight in enc[:-1]:  # the last convolution maps to the latents
        if kind == "conv":
            enc_channels.append(int(weight.shape[0]))
            enc_blocks.append(0)
        else:
            enc_blocks[-1] += 1
    dec_channels, dec_blocks = [], []
    previous = "conv"
    for kind, weight in dec[1:]:  # the first convolution maps from the latents
        if kind == "block":
            if previous == "conv":
                dec_channels.append(int(weight.shape[0]))
                dec_blocks.append(0)
            dec_blocks[-1] += 1
        previous = kind
    return {
        "in_channels": int(enc[0][1].shape[1]),
        "out_channels": int(dec[-1][1].shape[0]),
        "encoder_block_out_channels": tuple(enc_channels),
        "decoder_block_out_channels": tuple(dec_channels),
        "num_encoder_blocks": tuple(enc_blocks),
        "num_decoder_blocks": tuple(dec_blocks),
        "latent_channels": int(enc[-1][1].shape[0]),
    }


def _check_channels(spec: str, found: Any, wanted: int) -> None:
    if found != wanted:
        raise VlrtError(
            f"tiny VAE {spec} has {found} latent channels but the model's UNet takes {wanted}: "
            "use the tiny VAE made for this model (TAESD for SD 1.x/2.x, TAESDXL for SDXL)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
