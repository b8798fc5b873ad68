"""--vae: a folder or a single file (original or diffusers layout) in place of the model's VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_frames
from diffusers import AutoencoderKL
from original_layout import to_original, vae_to_original
from safetensors.torch import save_file

from vlrt.cli import main
from vlrt.demo import DEMO_MODEL_DIR
from vlrt.errors import VlrtError
from vlrt.model.loading import ModelOptions, load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """The demo's VAE with every weight nudged: decodes like it, but is not it."""
    vae = AutoencoderKL.from_pretrained(DEMO_MODEL_DIR / "vae")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    folder = tmp_path_factory.mktemp("vae") / "my-vae"
    vae.save_pretrained(folder)
    return vae, folder


def assert_vae_is(model, vae) -> None:
    mine, theirs = model.vae.state_dict(), vae.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("form", ["folder", "model_folder", "original_file", "prefixed_file", "diffusers_file"])
def test_vae_override_in_every_form(form, other_vae, tmp_path):
    vae, folder = other_vae
    if form == "folder":
        spec = folder
    elif form == "model_folder":
        spec = tmp_path / "model"
        (spec / "vae").mkdir(parents=True)
        for f in folder.iterdir():
            (spec / "vae" / f.name).write_bytes(f.read_bytes())
    elif form == "diffusers_file":
        spec = tmp_path / "vae.safetensors"
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(spec))
    else:  # the original layout, as VAE files are shared (with or without the first_stage_model. prefix)
        spec = tmp_path / "vae.safetensors"
        state = vae_to_original(vae.state_dict(), len(vae.config.block_out_channels))
        prefix = "" if form == "original_file" else "first_stage_model."
        save_file({prefix + k.removeprefix("first_stage_model."): v.contiguous() for k, v in state.items()}, str(spec))
    model = load_model("demo", CPU, options=ModelOptions(vae=str(spec)))
    assert_vae_is(model, vae)


def test_vae_override_on_a_single_file_model_that_has_none(tiny8_dir, tiny8_model, other_vae, tmp_path):
    state = to_original(tiny8_model.unet, tiny8_model.vae, tiny8_model.text_encoder)
    checkpoint = tmp_path / "novae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, str(checkpoint))
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny8_model.vae.state_dict().items()}, str(vae_file))
    model = load_model(str(checkpoint), CPU, options=ModelOptions(model_config=str(tiny8_dir), vae=str(vae_file)))
    assert_vae_is(model, tiny8_model.vae)
    with pytest.raises(VlrtError, match="holds no VAE"):
        load_model(str(checkpoint), CPU, options=ModelOptions(model_config=str(tiny8_dir)))


def test_vae_override_changes_the_frames(other_vae, clip_folder, tmp_path):
    _, folder = other_vae
    base = ["render", str(clip_folder), "-o", None, "--model", "demo", "--loop-n", "1", "--steps", "3", "--max-frames", "1",
            "--seed", "3", "--backend", "torch", "--quiet"]
    for name, extra in (("plain", []), ("vae", ["--vae", str(folder)])):
        base[3] = str(tmp_path / name) + "/"
        assert main(base + extra) == 0
    plain, other = read_frames(tmp_path / "plain"), read_frames(tmp_path / "vae")
    assert len(other) == 1 and max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(plain, other)) > 0


@pytest.mark.parametrize("form", ["folder", "file", "not_a_vae", "missing"])
def test_a_vae_of_the_wrong_latent_size_is_one_clear_line_naming_the_file(form, clip_folder, tmp_path, capsys):
    wide = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=8, layers_per_block=1)
    if form == "folder":
        spec = tmp_path / "vae16"
        wide.save_pretrained(spec)
    elif form == "file":
        spec = tmp_path / "vae16.safetensors"
        save_file(vae_to_original(wide.state_dict(), 2), str(spec))
    elif form == "not_a_vae":
        spec = tmp_path / "other.safetensors"
        save_file({"foo.weight": torch.zeros(2, 2)}, str(spec))
    else:
        spec = tmp_path / "nowhere.safetensors"
    out = tmp_path / "out.mp4"
    code = main(["render", str(clip_folder), "-o", str(out), "--model", "demo", "--vae", str(spec), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err, err
    assert str(spec) in err, err
    expected = {"folder": "has 16 latent channels but the model's UNet takes 4", "file": "has 16 latent channels",
                "not_a_vae": "is not a VAE", "missing": "does not exist"}[form]
    assert expected in err, err
    assert not out.exists()
