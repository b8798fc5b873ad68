"""Few-step models: an LCM-LoRA with the LCM sampler at CFG 1, the WebUI's "SGM Uniform" schedule type
(trailing timesteps) for Turbo/Lightning-style models, and CFG ≤ 1 running no unconditional UNet rows."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import read_frames
from diffusers import EulerAncestralDiscreteScheduler, LCMScheduler
from PIL import Image
from safetensors.torch import save_file
from tiny_sd import load_pipeline

from vlrt.demo import DEMO_MODEL_DIR
from vlrt.engines.torch_engine import TorchEngine
from vlrt.model.loading import ModelOptions, load_model
from vlrt.model.samplers import SCHEDULE_CONFIG
from vlrt.render.pipeline import render
from vlrt.settings.config import SCHEDULE_TYPES, build_settings

# The modules latent-consistency/lcm-lora-sdv1-5 adapts (its keys are kohya-style, diffusers' module
# paths: lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight / .lora_up.weight / .alpha): the
# attention projections and feed-forwards, every resnet's convolutions and time embedding projection,
# and the down/up samplers' convolutions. UNet only: the text encoder is untouched.
LCM_TARGETS = re.compile(
    r"(attn[12]\.to_(q|k|v|out\.0)|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|downsamplers\.0\.conv|upsamplers\.0\.conv)\.weight$"
)
RANK, ALPHA = 4, 4.0


def write_lcm_lora(path, unet, seed: int = 5) -> int:
    """A random LoRA with LCM-LoRA's key names for `unet`; returns how many modules it adapts."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, weight in unet.state_dict().items():
        if weight.ndim not in (2, 4) or not LCM_TARGETS.search(key):
            continue
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        kernel = weight.shape[2:]
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, weight.shape[1], *kernel, generator=g) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], RANK, *([1, 1] if kernel else []), generator=g) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path))
    return len(tensors) // 3


@pytest.fixture
def unet_rows(monkeypatch):
    """Every UNet engine call's rows and text embeddings."""
    calls: list[torch.Tensor] = []
    real = TorchEngine._run

    def recording(self, feed):
        if self.component == "unet":
            calls.append(feed["encoder_hidden_states"].clone())
        return real(self, feed)

    monkeypatch.setattr(TorchEngine, "_run", recording)
    return calls


def _pipeline_frames(pipe, clip_folder, settings, count):
    pipe.set_progress_bar_config(disable=True)
    return [
        np.asarray(pipe(prompt=settings["prompt"], image=Image.fromarray(frame), strength=settings["denoising_strength"],
                        num_inference_steps=settings["steps"], guidance_scale=settings["cfg_scale"],
                        generator=torch.Generator().manual_seed(settings["seed"])).images[0])
        for frame in read_frames(clip_folder)[:count]
    ]


def test_lcm_lora_with_the_lcm_sampler_at_cfg_1_equals_diffusers(demo_model, clip_folder, tmp_path, unet_rows):
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    assert write_lcm_lora(lora, demo_model.unet) > 30
    common = dict(model="demo", backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name="LCM", steps=4,
                  denoising_strength=0.75, cfg_scale=1.0, seed=7, prompt="a striped pattern", negative_prompt="blurry",
                  max_frames=2, max_batch=8)
    render(build_settings(overrides=dict(common, lora=[str(lora)])), str(clip_folder), str(tmp_path / "lcm") + "/", quiet=True)
    got = read_frames(tmp_path / "lcm")

    pipe = load_pipeline(DEMO_MODEL_DIR)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    want = _pipeline_frames(pipe, clip_folder, common, 2)
    assert len(got) == 2
    for g, w in zip(got, want):
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 2
    # int(4 × 0.75) = 3 steps of 2 frames, one row each: the negative prompt is never run at CFG ≤ 1.
    assert sum(c.shape[0] for c in unet_rows) == 2 * 3
    cond = demo_model.encode_prompt(common["prompt"])
    assert all(torch.equal(row, cond[0]) for call in unet_rows for row in call)
    fused = load_model("demo", torch.device("cpu"), options=ModelOptions(loras=(str(lora),))).unet.state_dict()
    plain = demo_model.unet.state_dict()
    for kind in ("downsamplers.0.conv", "upsamplers.0.conv", "resnets.0.time_emb_proj", "resnets.0.conv1", "attn2.to_k"):
        key = next(k for k in plain if kind in k and k.endswith(".weight"))
        assert not torch.equal(fused[key], plain[key]), key  # every kind of LCM-LoRA key reached its module


@pytest.mark.parametrize("cfg, rows_per_step", [(0.5, 1), (1.0, 1), (1.5, 2), (7.0, 2)])
def test_cfg_at_most_1_runs_no_unconditional_rows(cfg, rows_per_step, clip_folder, tmp_path, unet_rows):
    render(build_settings(overrides=dict(model="demo", backend="torch", loop_n=1, steps=4, denoising_strength=0.5,
                                         cfg_scale=cfg, seed=1, max_frames=3)),
           str(clip_folder), str(tmp_path / "out") + "/", quiet=True)
    assert sum(c.shape[0] for c in unet_rows) == 3 * 2 * rows_per_step


def test_sgm_uniform_is_trailing_timesteps_as_diffusers_runs_turbo_models(demo_model, clip_folder, tmp_path, unet_rows):
    common = dict(model="demo", backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name="Euler a", steps=4,
                  denoising_strength=0.5, cfg_scale=1.0, seed=3, prompt="a striped pattern", max_frames=2)
    for name, schedule in (("sgm", "SGM Uniform"), ("auto", "Automatic")):
        render(build_settings(overrides=dict(common, scheduler=schedule)), str(clip_folder), str(tmp_path / name) + "/",
               quiet=True, model=demo_model)
    sgm, auto = read_frames(tmp_path / "sgm"), read_frames(tmp_path / "auto")

    pipe = load_pipeline(DEMO_MODEL_DIR)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    want = _pipeline_frames(pipe, clip_folder, common, 2)
    for g, w in zip(sgm, want):
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 2
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(sgm, auto)) > 10  # another schedule
    assert SCHEDULE_CONFIG.keys() == set(SCHEDULE_TYPES)
