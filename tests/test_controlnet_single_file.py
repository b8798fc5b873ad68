"""ControlNets as single files, in diffusers' key layout or the original one (ControlNet 1.0/1.1, and SDXL's
with label_emb): loaded offline, their architecture read from their keys, SD 1.x/2.x and SDXL alike.

The files are written from diffusers ControlNets: diffusers' layout is the state dict saved as it is, the
original layout comes from the independent diffusers→original mapping of `original_layout.controlnet_to_original`,
so loading either back must give the very weights, and the very frames, of the folder it was written from.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import read_frames
from controlnet_fixtures import make_tiny_controlnet, write_diffusers_file
from diffusers import ControlNetModel, UNet2DConditionModel
from original_layout import controlnet_to_original
from safetensors.torch import save_file

from vlrt.cli import main
from vlrt.errors import VlrtError
from vlrt.model.checkpoints import CONFIGS
from vlrt.model.controlnet import controlnet_structure, diffusers_layout, load_controlnets, single_file_config
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


def _write(folder, path, form: str) -> dict:
    """The folder's ControlNet as one file of `form`: diffusers' keys, the original keys under control_model.
    (ControlNet 1.0), or bare (1.1, as a .pth)."""
    if form == "diffusers":
        return write_diffusers_file(folder, path)
    state = controlnet_to_original(ControlNetModel.from_pretrained(folder, local_files_only=True), "control_model." * (form == "original-1.0"))
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return state


FORMS = [("diffusers", ".safetensors"), ("original-1.0", ".safetensors"), ("original-1.1", ".pth")]


@pytest.mark.parametrize("form, suffix", FORMS, ids=[f[0] for f in FORMS])
@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_single_file_renders_like_its_diffusers_folder(which, form, suffix, tiny8_model, sdxl_model, clip_folder, tmp_path,
                                                       no_network):
    """A tiny ControlNet of an SD 1.5-like model (VAE factor 8, so the original 8-convolution hint encoder) or of the
    tiny SDXL (with the pooled-embedding and size layers), as one file of each form: the folder's weights and
    frames exactly."""
    model = tiny8_model if which == "sd" else sdxl_model
    folder = make_tiny_controlnet(model, tmp_path / "cn", seed=5)
    path = tmp_path / f"control_tiny{suffix}"
    state = _write(folder, path, form)
    if form.startswith("original"):
        assert any(k.endswith("input_hint_block.0.weight") for k in state) and any("zero_convs.0.0" in k for k in state)
        assert any(k.endswith("label_emb.0.0.weight") for k in state) is (which == "sdxl")
    found = controlnet_structure(diffusers_layout({k: tuple(v.shape) for k, v in state.items()}, path), path)
    assert found.shipped is None and found.sdxl is (which == "sdxl")  # not an SD size: the keys' structure, the UNet's heads
    assert found.width == model.cross_attention_dim
    network = ControlNetModel.from_pretrained(folder, local_files_only=True)
    loaded = load_controlnets([ControlNetUnit(str(path))], model)[0]
    mine, theirs = loaded.network.state_dict(), network.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    want = _render(model, f"model={folder},weight=1.5", clip_folder, tmp_path / "folder")
    got = _render(model, f"model={path},weight=1.5", clip_folder, tmp_path / "single")
    plain = _render(model, f"model={folder},weight=0", clip_folder, tmp_path / "off")
    assert len(got) == 3
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(want, plain)) > 2  # the ControlNet acts


@pytest.mark.parametrize("variant", ["depth-0-transformers", "no-mid-attention", "deep-mid-after-plain-level"])
def test_sdxl_controlnets_with_fewer_transformer_layers_load(variant, sdxl_model, tmp_path):
    """The "mid" and "small" SDXL ControlNets have transformer levels of 0 layers, or none, and a mid block without
    attention; a mid block deeper than 1 after a level without attention (as SD 1.x's last level) takes its depth
    from that level's config entry: their files give those architectures and the folder's weights and residuals."""
    config = dict(ControlNetModel.from_unet(sdxl_model.unet, conditioning_embedding_out_channels=(16, 32)).config)
    if variant == "depth-0-transformers":
        config["transformer_layers_per_block"] = [1, 0]
    elif variant == "no-mid-attention":
        config.update(down_block_types=["DownBlock2D", "DownBlock2D"], mid_block_type="UNetMidBlock2D")
    else:
        config.update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], transformer_layers_per_block=[1, 2])
    torch.manual_seed(2)
    network = ControlNetModel.from_config(config)
    network.save_pretrained(tmp_path / "cn")
    path = tmp_path / "small.safetensors"
    write_diffusers_file(tmp_path / "cn", path)
    loaded = load_controlnets([ControlNetUnit(str(path))], sdxl_model)[0].network
    assert loaded.config.mid_block_type == config["mid_block_type"]
    assert loaded.config.down_block_types == config["down_block_types"]
    mine, theirs = loaded.state_dict(), network.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    g = torch.Generator().manual_seed(0)
    feed = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 7, sdxl_model.cross_attention_dim, generator=g),
                controlnet_cond=torch.rand(1, 3, 16, 16, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 24, generator=g), "time_ids": torch.rand(1, 6, generator=g)},
                return_dict=False)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip([*loaded(**feed)[0], loaded(**feed)[1]], [*network(**feed)[0], network(**feed)[1]]))


def _real_size(config: dict):
    """A real-size ControlNet on the meta device: keys and shapes, no weights."""
    with torch.device("meta"):
        return ControlNetModel.from_config(config)


def _sdxl_unet():
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "sdxl", subfolder="unet"))


@pytest.mark.parametrize("variant", ["large", "mid", "small"])
@pytest.mark.parametrize("form", ["diffusers", "original"])
def test_real_size_sdxl_controlnet_files_give_their_architecture(variant, form, tmp_path):
    """The keys of SDXL base's ControlNet (diffusers/controlnet-canny-sdxl-1.0's architecture) and of its "mid" and
    "small" variants, in either layout, with SDXL base's UNet for the heads, give a network of the very keys and
    shapes."""
    unet = _sdxl_unet()
    config = dict(ControlNetModel.from_unet(unet, load_weights_from_unet=False).config)
    if variant == "mid":
        config["transformer_layers_per_block"] = [0, 0, 1]
    elif variant == "small":
        config.update(down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"], transformer_layers_per_block=0,
                      mid_block_type="UNetMidBlock2D")
    network = _real_size(config)
    state = network.state_dict() if form == "diffusers" else controlnet_to_original(network, "")
    shapes = diffusers_layout({k: tuple(v.shape) for k, v in state.items()}, tmp_path / "c.safetensors")
    model = SimpleNamespace(unet=unet, is_sdxl=True, is_inpainting=False, cross_attention_dim=2048, vae_scale_factor=8)
    built = _real_size(single_file_config(shapes, tmp_path / "c.safetensors", model))
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert built.config.projection_class_embeddings_input_dim == 2816 and built.config.addition_time_embed_dim == 256
    assert list(built.config.attention_head_dim) == [5, 10, 20]


@pytest.mark.parametrize("name, width", [("controlnet-sd1", 768), ("controlnet-sd2", 1024)])
@pytest.mark.parametrize("form", ["control_model.", "", "diffusers"])
def test_sd1_and_sd2_controlnet_files_are_told_apart_by_their_keys(name, width, form, demo_model, tmp_path):
    """Real SD 1.x and SD 2.x ControlNet layouts (original keys with and without prefix, diffusers' keys) give
    their family and the shipped config, unchanged; on another model they are refused with what was found."""
    network = _real_size(ControlNetModel.load_config(CONFIGS / name))
    state = network.state_dict() if form == "diffusers" else controlnet_to_original(network, form)
    shapes = diffusers_layout({k: tuple(v.shape) for k, v in state.items()}, tmp_path / "control.safetensors")
    found = controlnet_structure(shapes, tmp_path / "control.safetensors")
    assert found.width == width and not found.sdxl
    assert found.shipped == CONFIGS / name
    assert found.structure["use_linear_projection"] is (width == 1024)
    assert found.structure["block_out_channels"] == [320, 640, 1280, 1280] and found.structure["layers_per_block"] == 2
    assert found.structure["down_block_types"][-1] == "DownBlock2D"
    family = {768: "SD 1.x", 1024: "SD 2.x"}[width]
    with pytest.raises(VlrtError, match=f"is for {family} \\(cross-attention width {width}\\) but the model is"):
        single_file_config(shapes, tmp_path / "control.safetensors", demo_model)
    # A fine-tune of another width per block keeps the family but not the shipped config.
    shapes["controlnet_cond_embedding.blocks.5.weight"] = (320, 96, 3, 3)
    shapes["controlnet_cond_embedding.conv_in.weight"] = (16, 1, 3, 3)  # a one-channel control image
    assert controlnet_structure(shapes, tmp_path / "c.safetensors").shipped is None


def test_not_a_controlnet_file_is_named(tmp_path):
    with pytest.raises(VlrtError, match="is not a ControlNet file .*: give a ControlNet model file"):
        diffusers_layout({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, tmp_path / "sd.safetensors")


def _missing_keys(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in ("controlnet_mid_block.weight", "down_blocks.1.resnets.0.norm1.bias")}


BAD_FILES = [
    ("missing keys", _missing_keys, "lacks 2 weights its architecture needs (controlnet_mid_block.weight, "
                                    "down_blocks.1.resnets.0.norm1.bias): is the file complete?"),
    ("union model keys", lambda s: {**s, "task_embedding": torch.zeros(6, 32)},
     "has 1 weights a ControlNet does not (task_embedding): it is another network"),
    ("wrong shape", lambda s: {**s, "controlnet_mid_block.weight": torch.zeros(48, 48, 3, 3)},
     "controlnet_mid_block.weight is (48, 48, 3, 3), its architecture's (48, 48, 1, 1)"),
]


@pytest.mark.parametrize("name, change, words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_diffusers_layout_file_is_one_line(name, change, words, sdxl_model, sdxl_dir, clip_folder, tmp_path, capsys):
    """A diffusers-layout SDXL ControlNet file without some of its weights, with weights of another network, or of
    another shape: one line naming the file and what is wrong, before any frame."""
    state = write_diffusers_file(make_tiny_controlnet(sdxl_model, tmp_path / "cn", seed=1), tmp_path / "full.safetensors")
    path = tmp_path / "bad.safetensors"
    save_file(change(state), str(path))
    out = tmp_path / "result" / "out.mp4"
    code = main(["render", str(clip_folder), "-o", str(out), "--model", str(sdxl_dir), "--loop-n", "1", "--steps", "2", "--quiet",
                 "--controlnet", str(path)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("vlrt: error: ControlNet file ") and "\n" not in err, err
    assert str(path) in err and words in err, err
    assert not out.parent.exists() or not any(out.parent.iterdir())
