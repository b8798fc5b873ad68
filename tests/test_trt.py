"""TensorRT end to end, on a CUDA machine with TensorRT and polygraphy (`pytest -m trt`).

Skipped elsewhere, with the reason `trt_available` gives. These are the checks a first GPU run
needs: every kind of plan against torch, a whole `--backend trt` render against torch on the same
GPU, a render to standard output that stays a clean container while TensorRT logs, and a second
model's VAE (its plans rebuilt, never refitted).
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import read_frames

from vlrt.engines.base import FASTDVDNET_BLOCK1, FASTDVDNET_BLOCK2, UNET, VAE_DECODER, VAE_ENCODER
from vlrt.engines.trt_engine import trt_available

TRT_OK, TRT_WHY = trt_available()
pytestmark = [pytest.mark.trt, pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)]


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _engines(networks, tmp_path, cuda, precision="fp16"):
    from vlrt.render.engine_picker import build_engines

    return build_engines(networks, "trt", device=cuda, max_batch=2, precision=precision,
                         engines_dir=tmp_path / "engines", log=lambda m: None)


def _against_torch(engine, net, cuda, rows=2):
    g = torch.Generator().manual_seed(7)
    feed = {k: (torch.rand if k in ("image", "frames") else torch.randn)((rows, *v.shape[1:]), generator=g)
            for k, v in net.example.items()}
    if "timestep" in feed:
        feed["timestep"] = torch.tensor([500.0, 20.5])[:rows]
    if "noise_map" in feed:
        feed["noise_map"] = torch.full_like(feed["noise_map"], 0.1)
    module = copy.deepcopy(net.module).to(cuda, torch.float32)
    with torch.no_grad():
        want = module(**{k: v.to(cuda) for k, v in feed.items()}).float()
    (got,) = engine(**{k: v.to(cuda) for k, v in feed.items()}).values()
    assert got.device == cuda and got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    return (got - want).abs().max().item() / want.abs().max().item()


def test_unet_and_vae_plans_match_torch(cuda, tmp_path):
    from vlrt.model.loading import load_model
    from vlrt.render.engine_picker import sd_networks

    model = load_model("demo", cuda)
    networks = sd_networks(model, 32, 32)
    nets = {n.component: copy.deepcopy(n) for n in networks}  # the picker moves the modules off the GPU
    engines = _engines(networks, tmp_path, cuda)
    for component in (UNET, VAE_ENCODER, VAE_DECODER):
        assert _against_torch(engines[component], nets[component], cuda) <= 2e-2, component


def test_fastdvdnet_plans_match_torch(cuda, tmp_path):
    from vlrt.fastdvdnet.network import FastDVDnet
    from vlrt.render.engine_picker import fastdvdnet_networks

    torch.manual_seed(0)
    networks = fastdvdnet_networks(FastDVDnet().eval(), 32, 48)
    nets = {n.component: copy.deepcopy(n) for n in networks}
    engines = _engines(networks, tmp_path, cuda)
    for component in (FASTDVDNET_BLOCK1, FASTDVDNET_BLOCK2):
        assert _against_torch(engines[component], nets[component], cuda) <= 2e-2, component


def test_a_second_models_vae_gets_its_own_plans(cuda, tmp_path):
    from vlrt.model.loading import load_model
    from vlrt.render.engine_picker import sd_networks

    first = load_model("demo", cuda)
    _engines(sd_networks(first, 32, 32), tmp_path, cuda)
    second = load_model("demo", cuda)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in second.vae.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g).to(p.device))
    networks = sd_networks(second, 32, 32)
    nets = {n.component: copy.deepcopy(n) for n in networks}
    engines = _engines(networks, tmp_path, cuda)
    for component in (VAE_ENCODER, VAE_DECODER):
        assert _against_torch(engines[component], nets[component], cuda) <= 2e-2, component


def test_tiny_vae_plans_match_torch(cuda, tmp_path):
    """A tiny VAE (TAESD's architecture, random weights) builds and runs as the full VAE's plans do."""
    from dataclasses import replace

    from test_tiny_vae import random_tiny_vae

    from vlrt.model.loading import load_model
    from vlrt.render.engine_picker import sd_networks

    model = load_model("demo", cuda)
    model = replace(model, vae=random_tiny_vae().to(cuda))
    networks = [n for n in sd_networks(model, 32, 32) if n.component != UNET]
    nets = {n.component: copy.deepcopy(n) for n in networks}
    engines = _engines(networks, tmp_path, cuda)
    for component in (VAE_ENCODER, VAE_DECODER):
        assert _against_torch(engines[component], nets[component], cuda) <= 2e-2, component


def _render(clip_folder, out, backend, extra=()):
    from vlrt.cli import main

    code = main(["render", str(clip_folder), "-o", str(out), "--model", "demo", "--backend", backend, "--device", "cuda",
                 "--precision", "fp16", "--loop-n", "2", "--steps", "6", "--denoising-strength", "0.5", "--seed", "9",
                 "--max-batch", "4", "--quiet", *extra])
    assert code == 0


def test_a_trt_render_matches_the_torch_render_on_the_same_gpu(clip_folder, tmp_path):
    _render(clip_folder, f"{tmp_path / 'torch'}/", "torch")
    _render(clip_folder, f"{tmp_path / 'trt'}/", "trt", ["--engines", str(tmp_path / "engines")])
    want, got = read_frames(tmp_path / "torch"), read_frames(tmp_path / "trt")
    assert len(got) == len(want) == 6
    diff = max(np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(got, want))
    assert diff <= 2.0  # mean 8-bit difference: fp16 kernels round differently, frames agree
    assert all(frame.mean() > 5 for frame in got)  # no black (NaN) frames


def test_a_trt_render_to_stdout_is_a_clean_container(clip_folder, tmp_path):
    import av

    command = [sys.executable, "-m", "vlrt", "render", str(clip_folder), "-o", "-", "--model", "demo",
               "--backend", "trt", "--device", "cuda", "--engines", str(tmp_path / "engines"), "--steps", "4",
               "--denoising-strength", "0.5", "--loop-n", "1", "--output-format", "nut"]
    done = subprocess.run(command, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    with av.open(io.BytesIO(done.stdout), format="nut") as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 6
    assert not done.stdout.lstrip().startswith(b"[")  # no log line before the container's header
