"""Loading the user's upstream FastDVDnet weights (SPEC.md §10), strictly.

The upstream `model.pth` is a flat state dict saved from `nn.DataParallel` (keys prefixed
`module.`) by PyTorch 1.0 (legacy pickle format). It is read with `weights_only=True` so a
checkpoint can never run code. Any key or shape that differs from the architecture is an error
that names the first mismatch: a silently half-loaded denoiser would only show as bad pictures.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from vlrt.errors import VlrtError

from .network import FastDVDnet

UPSTREAM_URL = "https://github.com/m-tassano/fastdvdnet"
UPSTREAM_BLOB = "001d08c260a2cde36b0c023e251e6be97f9f48dc"
PREFIX = "module."


def load_fastdvdnet(path: Path, device: str | torch.device = "cpu") -> FastDVDnet:
    """Build FastDVDnet from `path` (.pth with or without `module.`, or .safetensors), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise VlrtError(
            f"FastDVDNet weights not found: {path}; download model.pth from {UPSTREAM_URL} "
            f"(MIT licence) and check that `git hash-object model.pth` prints {UPSTREAM_BLOB}"
        )
    state = _read(path)
    prefix = PREFIX if state and all(k.startswith(PREFIX) for k in state) else ""
    state = {k[len(prefix) :]: v for k, v in state.items()}
    model = FastDVDnet()
    _check(model.state_dict(), state, path, prefix)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def save_upstream_layout(model: FastDVDnet, path: Path, legacy: bool = False) -> None:
    """Save like upstream: every state-dict entry (162, BatchNorm statistics included) under `module.`.

    `legacy=True` writes the pre-1.6 pickle format that the real `model.pth` uses.
    """
    state = {PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, Path(path), _use_new_zipfile_serialization=not legacy)


def _read(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise VlrtError(f"cannot read FastDVDNet weights {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise VlrtError(f"{path} is not a FastDVDnet state dict (expected a flat dict of tensors)")
    return dict(state)


def _check(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], path: Path, prefix: str) -> None:
    """Raise on the first key (in the architecture's order) that is missing or has the wrong shape.

    Keys are named as the file spells them (with its `module.` prefix, if any).
    """
    unexpected = [prefix + k for k in found if k not in expected]
    for key, ref in expected.items():
        want = tuple(ref.shape)
        if key not in found:
            extra = f"; the file has unexpected key {unexpected[0]!r}" if unexpected else ""
            raise VlrtError(
                f"{path}: not a FastDVDnet checkpoint: key {prefix + key!r} (shape {want}) is missing{extra}"
            )
        got = tuple(found[key].shape)
        if got != want:
            raise VlrtError(
                f"{path}: not a FastDVDnet checkpoint: key {prefix + key!r} has shape {got}, expected {want}"
            )
    if unexpected:
        raise VlrtError(f"{path}: not a FastDVDnet checkpoint: unexpected key {unexpected[0]!r}")
