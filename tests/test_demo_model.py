"""The built-in demo model: offline, small, and not degenerate (frames follow their inputs)."""

from __future__ import annotations

import numpy as np
import torch

from vlrt.demo import DEMO_MODEL_DIR
from vlrt.demo.clip import sample_frames
from vlrt.executor.jobs import image_to_tensor, tensor_to_image


def test_demo_folder_is_small_and_loads_offline(demo_model):
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 2 * 1024 * 1024
    assert demo_model.is_demo and demo_model.vae_scale_factor == 2


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse)


@torch.inference_mode()
def test_demo_vae_reconstructs_its_input_where_a_random_vae_does_not(demo_model):
    from diffusers import AutoencoderKL

    frames = sample_frames(30, (64, 48))
    picks = [frames[0], frames[17]]  # pictures of the sample clip, which the VAE never trained on

    def roundtrip(vae, image):
        x = image_to_tensor(torch.from_numpy(image)).unsqueeze(0)
        return tensor_to_image(vae.decode(vae.encode(x).latent_dist.mode()).sample[0]).numpy()

    trained = [_psnr(roundtrip(demo_model.vae, f), f) for f in picks]
    torch.manual_seed(0)
    random_vae = AutoencoderKL.from_config(demo_model.vae.config).eval()
    untrained = [_psnr(roundtrip(random_vae, f), f) for f in picks]
    assert min(trained) > max(untrained) + 3
    # Different inputs give different outputs: frames that are mixed up would be noticed.
    a, b = (roundtrip(demo_model.vae, f) for f in picks)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_prompts_change_the_text_embedding(demo_model):
    a, b = demo_model.encode_prompt("stripes"), demo_model.encode_prompt("a smooth gradient")
    assert a.shape == (1, 77, demo_model.cross_attention_dim)
    assert (a - b).abs().max() > 1e-3
    assert demo_model.encode_prompt("stripes") is a  # computed once per distinct prompt
