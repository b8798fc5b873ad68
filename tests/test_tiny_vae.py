"""--vae with a tiny autoencoder (TAESD): diffusers' AutoencoderTiny folder or TAESD's original pair of
files, used as diffusers' img2img pipeline uses it (its latents, no posterior sample, scaling factor 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_frames
from diffusers import AutoencoderTiny, EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image
from safetensors.torch import save_file
from tiny_sd import load_pipeline

from vlrt.cli import main
from vlrt.demo import DEMO_MODEL_DIR
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

# The demo model's VAE scale factor is 2: two stages.
TINY_CONFIG = dict(
    encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4,
)
RENDER = dict(model="demo", loop_n=1, superimpose_alpha=1.0, steps=6, denoising_strength=0.6, cfg_scale=6.0, seed=21,
              prompt="a striped pattern", negative_prompt="blurry", max_frames=2, sampler_name="Euler a")


def random_tiny_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderTiny:
    """Random weights scaled so that decoded frames span the 8-bit range (default init decodes to near black)."""
    torch.manual_seed(seed)
    vae = AutoencoderTiny(**{**TINY_CONFIG, "latent_channels": latent_channels})
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim == 4:
                p.mul_(2.0)
        vae.decoder.layers[-1].bias.add_(0.5)
    return vae.eval()


def original_layout(vae: AutoencoderTiny) -> tuple[dict, dict]:
    """TAESD's own files: the encoder's Sequential as is, the decoder's after its leading clamp (index 0)."""
    encoder, decoder = {}, {}
    for key, value in vae.state_dict().items():
        half, _, index, rest = key.split(".", 3)
        if half == "encoder":
            encoder[f"{index}.{rest}"] = value.clone()
        else:
            decoder[f"{int(index) + 1}.{rest}"] = value.clone()
    return encoder, decoder


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    vae = random_tiny_vae()
    folder = tmp_path_factory.mktemp("taesd") / "taesd-diffusers"
    vae.save_pretrained(folder)
    return vae, folder


def test_tiny_vae_frames_equal_diffusers_img2img_with_autoencoder_tiny(tiny_vae, clip_folder, tmp_path):
    vae, folder = tiny_vae
    render(build_settings(overrides=dict(RENDER, vae=str(folder), backend="torch")), str(clip_folder),
           str(tmp_path / "tiny") + "/", quiet=True)
    render(build_settings(overrides=dict(RENDER, backend="torch")), str(clip_folder), str(tmp_path / "full") + "/", quiet=True)
    got, full = read_frames(tmp_path / "tiny"), read_frames(tmp_path / "full")

    base = load_pipeline(DEMO_MODEL_DIR)
    pipe = StableDiffusionImg2ImgPipeline(**{**base.components, "vae": vae})
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert len(got) == 2
    for frame_in, frame_out in zip(read_frames(clip_folder)[:2], got):
        want = pipe(prompt=RENDER["prompt"], negative_prompt=RENDER["negative_prompt"], image=Image.fromarray(frame_in),
                    strength=RENDER["denoising_strength"], num_inference_steps=RENDER["steps"],
                    guidance_scale=RENDER["cfg_scale"], generator=torch.Generator().manual_seed(RENDER["seed"])).images[0]
        assert np.abs(frame_out.astype(int) - np.asarray(want).astype(int)).max() <= 2
        assert frame_out.std() > 10  # a picture, not a flat clamp
    assert np.mean([np.abs(g.astype(int) - f.astype(int)).mean() for g, f in zip(got, full)]) > 5  # the tiny VAE decoded them


@pytest.mark.parametrize("form", ["pth_pair", "safetensors_folder"])
def test_taesd_original_files_give_the_same_frames(form, tiny_vae, clip_folder, tmp_path):
    vae, folder = tiny_vae
    encoder, decoder = original_layout(vae)
    if form == "pth_pair":  # given decoder first: the halves are told apart by their keys
        torch.save(encoder, tmp_path / "taesd_encoder.pth")
        torch.save(decoder, tmp_path / "taesd_decoder.pth")
        spec = f"{tmp_path / 'taesd_decoder.pth'},{tmp_path / 'taesd_encoder.pth'}"
    else:
        (tmp_path / "taesd").mkdir()
        save_file(encoder, str(tmp_path / "taesd" / "taesd_encoder.safetensors"))
        save_file(decoder, str(tmp_path / "taesd" / "taesd_decoder.safetensors"))
        spec = str(tmp_path / "taesd")
    for name, vae_spec in (("folder", str(folder)), ("original", spec)):
        render(build_settings(overrides=dict(RENDER, vae=vae_spec, backend="torch")), str(clip_folder),
               str(tmp_path / name) + "/", quiet=True)
    diffusers_form, original_form = read_frames(tmp_path / "folder"), read_frames(tmp_path / "original")
    assert len(original_form) == 2
    assert all(np.array_equal(a, b) for a, b in zip(diffusers_form, original_form))


def test_tiny_vae_on_onnx_runtime_equals_torch_and_has_its_own_engines(tiny_vae, clip_folder, tmp_path):
    _, folder = tiny_vae
    engines = tmp_path / "engines"
    for name, backend, vae in (("torch", "torch", str(folder)), ("ort", "ort", str(folder)), ("ort_full", "ort", "")):
        render(build_settings(overrides=dict(RENDER, vae=vae, backend=backend, engines=str(engines))), str(clip_folder),
               str(tmp_path / name) + "/", quiet=True)
    torch_frames, ort_frames = read_frames(tmp_path / "torch"), read_frames(tmp_path / "ort")
    assert len(ort_frames) == 2
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(torch_frames, ort_frames)) <= 3
    for component in ("vae_encoder", "vae_decoder"):  # one cache entry per VAE: their weights hash apart
        assert len([p for p in engines.iterdir() if p.is_dir() and f"-{component}-" in p.name]) == 2
    assert len([p for p in engines.iterdir() if p.is_dir() and "-unet-" in p.name]) == 1


def test_bad_tiny_vaes_are_refused_in_one_line(tmp_path, clip_folder, capsys):
    sd3 = tmp_path / "taesd3"
    random_tiny_vae(latent_channels=16).save_pretrained(sd3)
    encoder, _ = original_layout(random_tiny_vae())
    torch.save(encoder, tmp_path / "taesd_encoder.pth")
    (tmp_path / "half").mkdir()
    torch.save(encoder, tmp_path / "half" / "taesd_encoder.pth")
    cases = {
        str(sd3): "has 16 latent channels but the model's UNet takes 4",
        str(tmp_path / "taesd_encoder.pth"): "is only TAESD's encoder",
        str(tmp_path / "half"): "holds only TAESD's encoder",
        f"{tmp_path / 'taesd_encoder.pth'},{tmp_path / 'missing_decoder.pth'}": "missing_decoder.pth does not exist",
    }
    for vae, message in cases.items():
        out = tmp_path / "out"
        code = main(["render", str(clip_folder), "-o", str(out) + "/", "--model", "demo", "--vae", vae, "--loop-n", "1",
                     "--steps", "2", "--max-frames", "1", "--backend", "torch", "--quiet"])
        err = capsys.readouterr().err
        assert code != 0
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() or not any(out.glob("*.png"))
