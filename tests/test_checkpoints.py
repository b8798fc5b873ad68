"""Single-file checkpoints in the original key layout, loaded offline; CLIP's vocabulary; bad files.

Checkpoints are written from diffusers models with the independent diffusers→original mapping
of `original_layout.py`, so loading one back must give the very weights it was written from.
The real SD 1.5 sizes are in test_sd15_single_file.py (slow).
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_frames
from diffusers import AutoencoderKL, UNet2DConditionModel
from original_layout import to_original
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from vlrt.cli import main
from vlrt.errors import VlrtError
from vlrt.model.checkpoints import CONFIGS, check_shipped, detect_architecture
from vlrt.model.clip_vocab import clip_tokenizer
from vlrt.model.loading import ModelOptions, load_model
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

CPU = torch.device("cpu")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def render_frames(model, clip_folder: Path, out: Path) -> list[np.ndarray]:
    settings = build_settings(overrides=dict(
        model=str(model.path), loop_n=1, steps=4, denoising_strength=0.5, cfg_scale=5.0, seed=5, max_frames=3,
        prompt="a (striped:1.2) pattern", negative_prompt="blurry", backend="torch",
    ))
    render(settings, str(clip_folder), str(out) + "/", quiet=True, model=model)
    return read_frames(out)


def assert_same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(mine) == set(theirs), name
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), f"{name}.{key}"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_offline_and_renders_like_the_folder(tiny8_dir, tiny8_model, clip_folder, tmp_path, no_network, suffix):
    state = to_original(tiny8_model.unet, tiny8_model.vae, tiny8_model.text_encoder)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in state)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    single = load_model(str(path), CPU, options=ModelOptions(model_config=str(tiny8_dir)))
    assert single.name == "tiny" and single.scheduler_config == tiny8_model.scheduler_config
    assert_same_weights(single, tiny8_model)
    if suffix == ".safetensors":
        want = render_frames(tiny8_model, clip_folder, tmp_path / "folder")
        got = render_frames(single, clip_folder, tmp_path / "single")
        assert len(got) == 3
        assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(got, want)) <= 1


def test_sd2_layout_single_file_with_an_open_clip_text_encoder(tmp_path, no_network):
    """OpenCLIP's packed q/k/v layout (SD 2.x) converts back to the same transformers text encoder."""
    from tiny_sd import make_tiny_sd

    folder = make_tiny_sd(tmp_path / "model", cross_attention_dim=32, seed=4)
    ref = load_model(str(folder), CPU)
    path = tmp_path / "sd2like.safetensors"
    save_file(to_original(ref.unet, ref.vae, ref.text_encoder, open_clip=True), str(path))
    single = load_model(str(path), CPU, options=ModelOptions(model_config=str(folder), prediction_type="v_prediction"))
    assert_same_weights(single, ref)
    assert single.scheduler_config["prediction_type"] == "v_prediction"


def meta_layout(config_name: str, open_clip: bool) -> dict[str, tuple[int, ...]]:
    """Key shapes of a checkpoint of a shipped architecture at full size, built on the meta device."""
    folder = CONFIGS / config_name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    state = to_original(unet, vae, text, open_clip=open_clip, extra_layer=open_clip)
    return {k: tuple(v.shape) for k, v in state.items()}, counts


def test_shipped_configs_are_the_real_architectures_and_are_told_apart():
    sd1, counts = meta_layout("sd1", open_clip=False)
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD 1.5's UNet, VAE and CLIP ViT-L/14 text tower
    arch = detect_architecture(sd1, Path("sd15.safetensors"))
    assert (arch.text_encoder, arch.cross_attention_dim, arch.has_vae) == ("clip", 768, True)
    check_shipped(arch, Path("sd15.safetensors"))
    assert arch.config_folder("auto") == CONFIGS / "sd1"

    sd2, counts = meta_layout("sd2-v", open_clip=True)
    assert counts[0] == 865_910_724  # SD 2.x's UNet
    arch = detect_architecture(sd2, Path("sd21.safetensors"))
    assert (arch.text_encoder, arch.cross_attention_dim) == ("open_clip", 1024)
    check_shipped(arch, Path("sd21.safetensors"))
    assert arch.config_folder("auto") == CONFIGS / "sd2-v"
    assert arch.config_folder("epsilon") == CONFIGS / "sd2"


def test_clip_tokenizer_comes_from_the_installed_open_clip_vocabulary():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # OpenAI CLIP's well-known ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407 and clip_tokenizer("!").pad_token_id == 0


def test_missing_vocabulary_package_says_how_to_install_it(monkeypatch):
    import importlib.metadata

    from vlrt.model import clip_vocab

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(VlrtError, match="pip install --no-deps open_clip_torch"):
        clip_vocab.vocab_path()


# --- bad files -------------------------------------------------------------------------------


def small(shape) -> torch.Tensor:
    return torch.zeros(shape)


BAD = {
    "lora.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": small((4, 8))}, "looks like a LoRA"),
    "vae.safetensors": ({"encoder.down.0.block.0.conv1.weight": small((8, 8, 3, 3))}, "looks like a VAE"),
    "other.safetensors": ({"backbone.layer1.weight": small((3, 3))}, "is not a Stable Diffusion checkpoint"),
    "sdxl.safetensors": (
        {"model.diffusion_model.input_blocks.0.0.weight": small((320, 4, 3, 3)),
         "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": small((8, 8))},
        "SDXL",
    ),
    "five.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": small((320, 5, 3, 3))}, "5 input channels (not an img2img model)"),
    "notext.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": small((320, 4, 3, 3))}, "no SD 1.x"),
    "noattn.safetensors": (
        {"model.diffusion_model.input_blocks.0.0.weight": small((320, 4, 3, 3)),
         "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": small((8, 8))},
        "without cross-attention",
    ),
}


@pytest.mark.parametrize("name", [*BAD, "garbage.safetensors", "garbage.ckpt", "notes.txt", "tiny-unknown.safetensors"])
def test_bad_checkpoints_are_one_clear_line_naming_the_file(name, tiny8_model, clip_folder, tmp_path, capsys):
    path = tmp_path / name
    if name in BAD:
        save_file(BAD[name][0], str(path))
        expected = BAD[name][1]
    elif name.startswith("garbage"):
        path.write_bytes(b"\x00not a checkpoint" * 10)
        expected = "not a readable .safetensors file" if name.endswith(".safetensors") else "cannot be read as a safe .ckpt"
    elif name == "notes.txt":
        path.write_text("hello")
        expected = "not a .safetensors or .ckpt checkpoint"
    else:  # a real layout, but a cross-attention width vlrt ships no config for, and no --model-config
        save_file(to_original(tiny8_model.unet, tiny8_model.vae, tiny8_model.text_encoder), str(path))
        expected = "unknown architecture: a clip text encoder with cross-attention width 48"
    out = tmp_path / "out.mp4"
    code = main(["render", str(clip_folder), "-o", str(out), "--model", str(path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err, err
    assert str(path) in err and expected in err, err
    assert not out.exists() and not list(tmp_path.glob("out.mp4*"))


def test_single_file_options_on_the_command_line(tiny8_dir, tiny8_model, clip_folder, tmp_path):
    """--model FILE --model-config DIR --prediction-type --clip-skip reach the model and the settings file."""
    import tomllib

    path = tmp_path / "tiny.safetensors"
    save_file(to_original(tiny8_model.unet, tiny8_model.vae, tiny8_model.text_encoder), str(path))
    out = tmp_path / "out"
    code = main(["render", str(clip_folder), "-o", str(out) + "/", "--model", str(path), "--model-config", str(tiny8_dir),
                 "--prediction-type", "v_prediction", "--clip-skip", "2", "--loop-n", "1", "--steps", "2",
                 "--max-frames", "1", "--backend", "torch", "--quiet"])
    assert code == 0 and len(read_frames(out)) == 1
    saved = tomllib.loads((out / "settings.toml").read_text())["render"]
    assert (saved["model_config"], saved["prediction_type"], saved["clip_skip"]) == (str(tiny8_dir), "v_prediction", 2)
    from vlrt.render.pipeline import open_model

    model = open_model(build_settings(saved), CPU)
    assert model.scheduler_config["prediction_type"] == "v_prediction" and model.prompts.clip_skip == 2


def test_clip_skip_beyond_the_encoder_is_one_clear_line(clip_folder, tmp_path, capsys):
    code = main(["render", str(clip_folder), "-o", str(tmp_path / "o.mp4"), "--model", "demo", "--clip-skip", "5", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and "clip_skip 5 is out of range" in err
