"""`vlrt bench occupancy`: the modelled GPU queues work like CUDA, and the command reports what it measured."""

from __future__ import annotations

import json

import pytest
import torch

from vlrt.cli import main
from vlrt.engines.base import UNET
from vlrt.tools import occupancy


def test_modelled_calls_return_at_once_and_synchronize_waits_for_the_queued_time(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(occupancy.time, "sleep", slept.append)
    engines, device = occupancy.modelled_engines("rtx4090", max_batch=4, scale=8, channels=4)
    sample = torch.zeros(3, 4, 8, 8)
    out = engines.unet(sample=sample, timestep=torch.zeros(3), encoder_hidden_states=torch.zeros(3, 2, 8))
    out2 = engines.vae_decoder(latent=torch.zeros(2, 4, 8, 8))
    assert slept == []  # the calls queued their time and returned, as CUDA calls do
    a, b = occupancy.PROFILES["rtx4090"][UNET]
    da, db = occupancy.PROFILES["rtx4090"]["vae_decoder"]
    expected = (a + 3 * b + da + 2 * db) / 1000  # 2.5 × the H100's costs, one call after the other
    assert abs(device.busy - expected) < 1e-9
    assert out["noise_pred"].shape == sample.shape and out2["image"].shape == (2, 3, 64, 64)
    device.free_at = occupancy.time.perf_counter() + expected  # as if queued just now
    engines.synchronize()
    assert slept and expected - 0.05 < slept[0] <= expected  # the host waited for the queue to drain


def test_bench_occupancy_prints_one_json_object_per_case(monkeypatch, capsys):
    real = occupancy.bench_occupancy
    case = {"loop_n 2, 4 steps × 0.5": dict(loop_n=2, steps=4, denoising_strength=0.5, cfg_scale=7.0)}
    monkeypatch.setattr(occupancy, "bench_occupancy", lambda profile: real(profile, frames=4, size=(64, 64), cases=case))
    assert main(["bench", "occupancy", "--profile", "rtx4090", "--json"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert result["profile"] == "rtx4090" and result["frames"] == 4
    assert 0 < result["occupancy"] <= 1.0 + 1e-6
    assert result["device_bound_frames_per_s"] >= result["frames_per_s"]
    # 4 frames × 2 passes × 2 steps × 2 CFG rows, batched into calls of at most 8 rows
    assert result["engine_calls"]["vae_encoder"] >= 1 and result["engine_calls"]["unet"] >= 32 / 8


def test_a_modelled_tiny_vae_costs_taesds_share_and_gives_latents():
    """The tiny VAE's engines: TAESD's FLOP share of the full VAE's per-row time (ANCHORS.md), latents out."""
    full, _ = occupancy.modelled_engines("h100", max_batch=4)
    tiny, device = occupancy.modelled_engines("h100", max_batch=4, tiny_vae=True)
    for name, flops in (("vae_encoder", 0.12 / 1.12), ("vae_decoder", 0.14 / 2.51)):
        assert tiny[name].cost_ms == (full[name].cost_ms[0], pytest.approx(full[name].cost_ms[1] * flops))
    assert tiny.unet.cost_ms == full.unet.cost_ms
    out = tiny.vae_encoder(image=torch.zeros(2, 3, 64, 64))["moments"]
    assert out.shape == (2, 4, 8, 8)  # latents, not a posterior's moments
    assert device.busy == pytest.approx((0.5 + 4.0 * 0.12 / 1.12 * 2) / 1000)
