"""ControlNets as single files in the original layout: loaded offline, told apart by their keys.

The files are written from diffusers ControlNets with the independent diffusers→original mapping of
`original_layout.controlnet_to_original`, so loading one back must give the very weights, and the
very frames, of the folder it was written from.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from conftest import read_frames
from controlnet_fixtures import make_tiny_controlnet
from diffusers import ControlNetModel
from original_layout import controlnet_to_original
from safetensors.torch import save_file

from vlrt.errors import VlrtError
from vlrt.model.checkpoints import CONFIGS
from vlrt.model.controlnet import load_controlnets, original_structure, single_file_config
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings
from vlrt.settings.controlnet import ControlNetUnit


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test; the hub is offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _render(model, unit: str, clip_folder, out) -> list[np.ndarray]:
    settings = build_settings(overrides=dict(
        model=str(model.path), backend="torch", loop_n=1, steps=4, denoising_strength=0.6, cfg_scale=5.0, seed=9,
        max_frames=3, prompt="a striped pattern", negative_prompt="blurry", controlnet=[unit],
    ))
    render(settings, str(clip_folder), str(out) + "/", quiet=True, model=model)
    return read_frames(out)


@pytest.mark.parametrize("suffix, prefix", [(".safetensors", "control_model."), (".pth", "")],
                         ids=["safetensors-1.0-keys", "pth-1.1-keys"])
def test_original_layout_file_renders_like_its_diffusers_folder(tiny8_model, clip_folder, tmp_path, no_network, suffix, prefix):
    """A tiny ControlNet of a model with VAE factor 8 (so the original 8-convolution hint encoder), in the
    original layout, converted offline: the folder's weights and frames exactly."""
    folder = make_tiny_controlnet(tiny8_model, tmp_path / "cn", seed=5)
    network = ControlNetModel.from_pretrained(folder, local_files_only=True)
    state = controlnet_to_original(network, prefix)
    assert f"{prefix}input_hint_block.14.weight" in state and f"{prefix}zero_convs.0.0.weight" in state
    path = tmp_path / f"control_tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    found = original_structure({k: tuple(v.shape) for k, v in state.items()}, path)
    assert found.shipped is None and found.width == 48  # not an SD size: the keys' structure, the UNet's heads
    loaded = load_controlnets([ControlNetUnit(str(path))], tiny8_model)[0]
    mine, theirs = loaded.network.state_dict(), network.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    want = _render(tiny8_model, f"model={folder},weight=1.5", clip_folder, tmp_path / "folder")
    got = _render(tiny8_model, f"model={path},weight=1.5", clip_folder, tmp_path / "single")
    plain = _render(tiny8_model, f"model={folder},weight=0", clip_folder, tmp_path / "off")
    assert len(got) == 3
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(want, plain)) > 2  # the ControlNet acts


def _shapes_of_shipped(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of a real-size ControlNet of a shipped config (built on the meta device: no weights)."""
    with torch.device("meta"):
        network = ControlNetModel.from_config(ControlNetModel.load_config(CONFIGS / name))
    return {k: tuple(v.shape) for k, v in controlnet_to_original(network, prefix).items()}


@pytest.mark.parametrize("name, family, width", [("controlnet-sd1", "SD 1.x", 768), ("controlnet-sd2", "SD 2.x", 1024)])
@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_sd1_and_sd2_controlnet_files_are_told_apart_by_their_keys(name, family, width, prefix, demo_model, tmp_path):
    """Real SD 1.x and SD 2.x ControlNet layouts give their family and the shipped config, unchanged; on another
    model they are refused with what was found."""
    shapes = _shapes_of_shipped(name, prefix)
    found = original_structure(shapes, tmp_path / "control.safetensors")
    assert found.family.startswith(family) and found.width == width
    assert found.shipped == CONFIGS / name
    assert found.structure["use_linear_projection"] is (width == 1024)
    assert found.structure["block_out_channels"] == [320, 640, 1280, 1280] and found.structure["layers_per_block"] == 2
    assert found.structure["down_block_types"][-1] == "DownBlock2D"
    with pytest.raises(VlrtError, match=f"is for {family} \\(cross-attention width {width}\\) but the model is"):
        single_file_config(shapes, tmp_path / "control.safetensors", demo_model)
    # A fine-tune of another width per block keeps the family but not the shipped config.
    shapes[f"{prefix}input_hint_block.14.weight"] = (320, 256, 3, 3)
    shapes[f"{prefix}input_hint_block.0.weight"] = (16, 1, 3, 3)  # a one-channel control image
    assert original_structure(shapes, tmp_path / "c.safetensors").shipped is None


def test_not_a_controlnet_file_is_named(tmp_path):
    with pytest.raises(VlrtError, match="not a ControlNet in the original layout"):
        original_structure({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, tmp_path / "sd.safetensors")
