"""`vlrt bench occupancy`: how busy the host would keep a GPU, measured without one.

The engines are stand-ins for a modelled device: each call queues `a + b·rows` milliseconds of
device time (what TensorRT fp16 would take on that GPU for SD 1.5 at 512×512) and returns tensors
of the right shapes at once, as an asynchronous GPU call returns; the executor waits for the device
at the end of each round, as it would on a GPU. Everything else is the real renderer: the source decodes a real 512×512 clip, the stages,
executor and samplers run as in any render, and the sink encodes an mp4. Occupancy is the
engines' busy time over the wall time: where it is low, the host is the bottleneck and a real GPU
would sit idle. What this does not measure: a real GPU (transfer costs, kernel overlap, the
engines' own speed).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from vlrt.engines.base import UNET, VAE_DECODER, VAE_ENCODER, Engine, EngineSet, Mark
from vlrt.settings.config import build_settings

# Milliseconds per call: (fixed, per row), for SD 1.5 at 512×512 in TensorRT fp16.
PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "h100": {UNET: (1.0, 2.3), VAE_ENCODER: (0.5, 4.0), VAE_DECODER: (0.5, 8.0)},
}
PROFILES["rtx4090"] = {name: (a * 2.5, b * 2.5) for name, (a, b) in PROFILES["h100"].items()}

# A tiny VAE's (TAESD's) share of the full SD VAE's work per row, from their FLOPs (ANCHORS.md:
# encoder 0.12 against 1.12 TFLOP, decoder 0.14 against 2.51 at 512×512); the fixed cost per call stays.
TINY_VAE_FLOPS = {VAE_ENCODER: 0.12 / 1.12, VAE_DECODER: 0.14 / 2.51}

# The settings the issues name: the extension's usual look, a fast few-step one, and 4-step LCM at CFG 1
# with the full and with a tiny VAE. `tiny_vae` is no setting: it picks the modelled tiny VAE.
CASES: dict[str, dict] = {
    "loop_n 4, 20 steps × 0.4, CFG 7": dict(loop_n=4, steps=20, denoising_strength=0.4, cfg_scale=7.0),
    "loop_n 10, 8 steps × 0.5, CFG 1.5, batch_size 2": dict(
        loop_n=10, steps=8, denoising_strength=0.5, cfg_scale=1.5, batch_size=2
    ),
    "loop_n 4, LCM 4 steps, CFG 1": dict(loop_n=4, sampler_name="LCM", steps=8, denoising_strength=0.5, cfg_scale=1.0),
    "loop_n 4, LCM 4 steps, CFG 1, tiny VAE": dict(
        loop_n=4, sampler_name="LCM", steps=8, denoising_strength=0.5, cfg_scale=1.0, tiny_vae=True
    ),
}


class ModelledDevice:
    """The modelled GPU's queue: calls run one after another, each starting when the device is free.

    Like CUDA work, a call returns at once; the host waits only for a mark (`ModelledEngine.wait`: the
    executor waits for each round one round later), so host work overlaps the device's. `busy` is
    the device time (s).
    """

    def __init__(self) -> None:
        self.free_at = 0.0
        self.busy = 0.0
        self._lock = threading.Lock()

    def enqueue(self, seconds: float) -> None:
        with self._lock:
            self.free_at = max(time.perf_counter(), self.free_at) + seconds
            self.busy += seconds



class ModelledEngine(Engine):
    """An engine that queues the modelled device time (`a + b·rows` ms) and returns outputs of the right shapes.

    What a GPU would do on the device costs the host nothing here either: the outputs are constants
    of the right shapes (views of one zero, made without touching memory), and the non-finite check,
    one reduction queued on a GPU, is part of the call's modelled time."""

    backend = "modelled"

    def __init__(self, component: str, cost_ms: tuple[float, float], max_batch: int, scale: int, channels: int,
                 device: ModelledDevice | None = None, tiny_vae: bool = False) -> None:
        super().__init__(component, max_batch, torch.device("cpu"))
        self.cost_ms, self.scale, self.channels, self.tiny_vae = cost_ms, scale, channels, tiny_vae
        self.modelled = device or ModelledDevice()
        self._zero = torch.zeros(())

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = next(iter(feed.values())).shape[0]
        self.modelled.enqueue((self.cost_ms[0] + self.cost_ms[1] * rows) / 1000)
        return self._outputs(feed, rows)

    def _finite(self, outputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        return outputs

    def mark(self) -> Mark:
        return Mark(self.modelled.free_at, 0)  # the time the device will have done the work queued so far

    def wait(self, mark: Mark) -> None:
        time.sleep(max(0.0, mark.event - time.perf_counter()))

    def _outputs(self, feed: Mapping[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        if self.component == UNET:
            return {"noise_pred": self._zero.expand(feed["sample"].shape)}
        if self.component == VAE_ENCODER:
            _, _, h, w = feed["image"].shape
            channels = self.channels if self.tiny_vae else 2 * self.channels  # a posterior's mean and log-variance
            return {"moments": self._zero.expand(rows, channels, h // self.scale, w // self.scale)}
        _, _, h, w = feed["latent"].shape
        return {"image": self._zero.expand(rows, 3, h * self.scale, w * self.scale)}


def modelled_engines(profile: str, max_batch: int, scale: int = 8, channels: int = 4,
                     tiny_vae: bool = False) -> tuple[EngineSet, ModelledDevice]:
    """The stand-in engines of one modelled GPU, and that GPU's queue; with `tiny_vae`, the VAE's per-row
    cost is TAESD's share of the full VAE's (`TINY_VAE_FLOPS`) and its encoder gives latents."""
    device = ModelledDevice()
    costs = dict(PROFILES[profile])
    if tiny_vae:
        costs.update({name: (costs[name][0], costs[name][1] * share) for name, share in TINY_VAE_FLOPS.items()})
    engines = EngineSet(**{name: ModelledEngine(name, cost, max_batch, scale, channels, device, tiny_vae)
                           for name, cost in costs.items()})
    return engines, device


def _scale8_model(tiny_vae: bool = False):
    """The demo model with an SD-shaped VAE config (scale factor 8, 4 latent channels; TAESD's shape with
    `tiny_vae`): only its shapes matter, the modelled engines compute nothing."""
    from vlrt.model.loading import load_model

    model = load_model("demo", torch.device("cpu"))
    if tiny_vae:
        vae = AutoencoderTiny(encoder_block_out_channels=(4,) * 4, decoder_block_out_channels=(4,) * 4,
                              num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4, latent_channels=4)
    else:
        vae = AutoencoderKL(
            block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=2, layers_per_block=1,
        )
    return replace(model, vae=vae)


@dataclass
class Occupancy:
    profile: str
    case: str
    frames: int
    wall_s: float
    busy_s: float
    calls: dict[str, int]

    @property
    def occupancy(self) -> float:
        return self.busy_s / self.wall_s

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s

    @property
    def device_bound_frames_per_s(self) -> float:
        """Frames/s if the host cost nothing: the modelled device busy all the time."""
        return self.frames / self.busy_s

    def as_json(self) -> dict:
        return {"profile": self.profile, "case": self.case, "frames": self.frames, "wall_s": round(self.wall_s, 3),
                "engine_busy_s": round(self.busy_s, 3), "occupancy": round(self.occupancy, 4),
                "frames_per_s": round(self.frames_per_s, 3),
                "device_bound_frames_per_s": round(self.device_bound_frames_per_s, 3), "engine_calls": self.calls}


def bench_occupancy(profile: str = "h100", frames: int = 24, size: tuple[int, int] = (512, 512),
                    cases: Mapping[str, dict] | None = None, max_batch: int = 8) -> list[Occupancy]:
    """Render a real clip through the real pipeline on modelled engines, once per case (after a warm-up)."""
    from vlrt.tools.bench import _write_clip

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    models = {tiny: _scale8_model(tiny) for tiny in (False, True)}
    cases = cases or CASES
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = _write_clip(Path(tmp) / "clip.mkv", frames, size)
        # An untimed 2-frame render first: what a process pays once (imports, among them PySceneDetect's,
        # which runs ffmpeg to find it; codec and Pillow plugin set-up) is no host overhead per frame.
        warm_up = _write_clip(Path(tmp) / "warm-up.mkv", 2, size)
        _render_case(profile, max_batch, next(iter(cases.values())), models, warm_up, Path(tmp) / "warm-up.mp4")
        for name, overrides in cases.items():
            wall, busy, calls = _render_case(profile, max_batch, overrides, models, clip, Path(tmp) / "out.mp4")
            results.append(Occupancy(profile, name, frames, wall, busy, calls))
    return results


def _render_case(profile: str, max_batch: int, overrides: dict, models: dict, clip: Path,
                 out: Path) -> tuple[float, float, dict[str, int]]:
    """One timed render of `clip` on modelled engines: (wall s, modelled busy s, engine calls)."""
    from vlrt.render.pipeline import render

    overrides = dict(overrides)
    tiny = overrides.pop("tiny_vae", False)
    settings = build_settings(overrides=dict(
        model="demo", seed=1, temporal_superimpose_alpha_list="0.2,0.6,0.2", max_batch=max_batch, **overrides
    ))
    engines, device = modelled_engines(profile, max_batch, tiny_vae=tiny)
    started = time.perf_counter()
    render(settings, str(clip), str(out), quiet=True, model=models[tiny], engines=engines)
    return time.perf_counter() - started, device.busy, engines.calls
