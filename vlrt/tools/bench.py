"""`vlrt bench`: speed and memory measured side by side in one run, reported as ratios.

Timings on shared machines are noisy, so every figure is compared only with one taken in the
same run on the same clip, and each configuration is run in alternation (best of `repeats`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import torch

from vlrt.engines.base import CONTROLNET, UNET, UNET_CONTROL, Engine
from vlrt.frames import Frame
from vlrt.io.sinks import open_sink
from vlrt.settings.config import Settings, build_settings


def _write_clip(path: Path, frames: int, size: tuple[int, int]) -> Path:
    """A lossless clip of the sample pictures, so decoding is cheap and exact."""
    from fractions import Fraction

    from vlrt.demo.clip import sample_frames

    sink = open_sink(str(path), fps=Fraction(24), lossless=True)
    for i, image in enumerate(sample_frames(frames, size)):
        sink.write(Frame(i, image))
    sink.close()
    return path


def peak_rss_of(command: list[str]) -> tuple[int, float]:
    """Run a command; return its peak resident memory in bytes (ru_maxrss) and its wall time."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark command failed: {' '.join(command)}\n{stderr}")
    return usage.ru_maxrss * 1024, elapsed


RENDER_ARGS = [
    "--model", "demo", "--backend", "torch", "--loop-n", "2", "--steps", "4", "--denoising-strength", "0.5",
    "--temporal-superimpose-alpha-list", "0.2,0.6,0.2", "--seed", "1",
]


def bench_memory(
    short: int = 60, long: int = 600, size: tuple[int, int] = (64, 64), command: tuple[str, ...] = ("render", *RENDER_ARGS)
) -> dict:
    """Peak memory of `vlrt COMMAND` over `short` and over `long` frames (separate processes, same settings)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for frames in (short, long):
            clip = _write_clip(Path(tmp) / f"clip{frames}.mkv", frames, size)
            argv = [sys.executable, "-m", "vlrt", command[0], str(clip), "-o", "-", "--output-format", "rawvideo",
                    *command[1:], "--quiet"]
            results[frames] = peak_rss_of(argv)
    return {
        "frames": (short, long),
        "peak_rss_mib": tuple(results[n][0] / 2**20 for n in (short, long)),
        "seconds": tuple(results[n][1] for n in (short, long)),
        "ratio": results[long][0] / results[short][0],
    }


def time_render(settings: Settings, clip: Path, model, repeats: int) -> float:
    """Best-of-`repeats` wall time of one in-process render to a throwaway output."""
    from vlrt.render.pipeline import render

    best = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            started = time.perf_counter()
            render(settings, str(clip), str(Path(tmp) / "out") + "/", quiet=True, model=model)
            best = min(best, time.perf_counter() - started)
    return best


def bench_throughput(
    configs: dict[str, dict], frames: tuple[int, int] = (12, 36), size: tuple[int, int] = (64, 64), repeats: int = 2
) -> dict[str, float]:
    """Steady-state frames per second of the same render under each named configuration (settings overrides).

    Each configuration renders a short and a long clip; frames/s is the extra frames over the extra
    time, so what every render pays once (loading engines, filling and draining the pipeline) does
    not count, as it does not on a long video.
    """
    base = build_settings(
        overrides=dict(model="demo", loop_n=2, steps=8, denoising_strength=0.5, seed=1, cfg_scale=5.0,
                       temporal_superimpose_alpha_list="0.2,0.6,0.2")
    )
    model = _models()
    short, long = frames
    with tempfile.TemporaryDirectory() as tmp:
        clips = {n: _write_clip(Path(tmp) / f"clip{n}.mkv", n, size) for n in frames}
        for overrides in configs.values():  # warm-up: engine exports, caches, allocator
            settings = replace(base, **overrides)
            time_render(settings, clips[short], model(settings), 1)
        times = {(name, n): float("inf") for name in configs for n in frames}
        for _ in range(repeats):  # alternate configurations so drifts in machine load hit all alike
            for name, overrides in configs.items():
                settings = replace(base, **overrides)
                for n in frames:
                    times[name, n] = min(times[name, n], time_render(settings, clips[n], model(settings), 1))
    return {name: (long - short) / (times[name, long] - times[name, short]) for name in configs}


def _models() -> Callable[[Settings], object]:
    """The demo model with each configuration's VAE (a draft's own), each loaded once."""
    from vlrt.render.pipeline import open_model
    from vlrt.settings.draft import model_vae

    loaded: dict[str, object] = {}

    def model(settings: Settings) -> object:
        vae = model_vae(settings)
        if vae not in loaded:
            loaded[vae] = open_model(settings, torch.device("cpu"))
        return loaded[vae]

    return model


def demo_tiny_vae(folder: Path) -> Path:
    """A random tiny autoencoder (TAESD's architecture) for the demo model, saved as a diffusers folder: 8 channels
    and one block a stage against the demo VAE's 16/32 channels, about as TAESD's 64 channels stand to SD's 128–512."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(folder)
    return folder


# The fast modes against the extension's usual settings, on ort with batching (`bench_throughput`'s clip).
def fast_mode_configs(tiny_vae: Path) -> dict[str, dict]:
    usual = dict(backend="ort", max_batch=16, sampler_name="Euler a", steps=20, cfg_scale=7.0)
    lcm = dict(backend="ort", max_batch=16, sampler_name="LCM", steps=8, cfg_scale=1.0)  # 8 × 0.5: 4 steps run
    return {
        "full VAE, Euler a 20 × 0.5, CFG 7": usual,
        "tiny VAE, Euler a 20 × 0.5, CFG 7": dict(usual, vae=str(tiny_vae)),
        "full VAE, LCM 4 steps, CFG 1": lcm,
        "tiny VAE, LCM 4 steps, CFG 1": dict(lcm, vae=str(tiny_vae)),
    }


def bench_vae_architectures(size: int = 128, repeats: int = 2) -> dict[str, float]:
    """Seconds per frame of one encode + decode with SD's VAE architecture and TAESD's (random weights, torch, CPU):
    the demo's own VAE is too small to show what a tiny VAE saves at SD's scale."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from vlrt.engines.modules import TinyVaeEncoderModule, VaeDecoderModule, VaeEncoderModule

    torch.manual_seed(0)
    sd = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4).eval()
    taesd = AutoencoderTiny().eval()  # diffusers' defaults are TAESD's architecture
    image = torch.rand(1, 3, size, size) * 2 - 1
    best = {"SD VAE": float("inf"), "TAESD": float("inf")}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, encoder, decoder in (("SD VAE", VaeEncoderModule(sd), VaeDecoderModule(sd)),
                                           ("TAESD", TinyVaeEncoderModule(taesd), VaeDecoderModule(taesd))):
                started = time.perf_counter()
                decoder(encoder(image)[:, :4])
                best[name] = min(best[name], time.perf_counter() - started)
    return best


def bench_draft(frames: int = 48, size: tuple[int, int] = (128, 128), repeats: int = 1) -> dict[str, float]:
    """Wall time of a render of `frames` frames and of its `--draft` (with a tiny `--draft-vae`), alternated, best of
    `repeats`, everything a render pays once included (a draft is a whole run)."""
    overrides = dict(model="demo", backend="torch", max_batch=8, loop_n=2, steps=20, denoising_strength=0.4, cfg_scale=7.0,
                     seed=1, temporal_superimpose_alpha_list="0.2,0.6,0.2")
    model = _models()
    with tempfile.TemporaryDirectory() as tmp:
        clip = _write_clip(Path(tmp) / "clip.mkv", frames, size)
        vae = demo_tiny_vae(Path(tmp) / "taesd")
        configs = {"full render": build_settings(overrides=overrides),
                   "--draft --draft-vae": build_settings(overrides=dict(overrides, draft=True, draft_vae=str(vae)))}
        short = _write_clip(Path(tmp) / "short.mkv", 4, size)
        for settings in configs.values():  # warm-up: engine exports
            time_render(settings, short, model(settings), 1)
        best = {name: float("inf") for name in configs}
        for _ in range(repeats):
            for name, settings in configs.items():
                best[name] = min(best[name], time_render(settings, clip, model(settings), 1))
    return best


@contextmanager
def engine_seconds() -> Iterator[dict[str, float]]:
    """Wall time spent in each component's engine calls while the context is open."""
    spent: dict[str, float] = defaultdict(float)
    original = Engine.__call__

    def timed(self: Engine, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        try:
            return original(self, **feed)
        finally:
            spent[self.component] += time.perf_counter() - started

    Engine.__call__ = timed  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        Engine.__call__ = original  # type: ignore[method-assign]


def bench_controlnet(frames: tuple[int, int] = (12, 36), size: tuple[int, int] = (64, 64), repeats: int = 2) -> dict:
    """Throughput with 0, 1 and 2 ControlNet units (random tiny ControlNets of the demo UNet, ort, batching on),
    and the time in the ControlNet engines per frame in UNet-equivalents (their seconds over the UNet's, same render)."""
    from diffusers import ControlNetModel

    from vlrt.model.loading import load_model
    from vlrt.settings.controlnet import ControlNetUnit

    model = load_model("demo", torch.device("cpu"))
    hint = tuple(16 * 2**i for i in range(model.vae_scale_factor.bit_length()))  # downscales by the VAE's factor
    with tempfile.TemporaryDirectory() as tmp:
        units = []
        for i in range(2):
            ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=hint).save_pretrained(Path(tmp) / f"cn{i}")
            units.append(ControlNetUnit(model=str(Path(tmp) / f"cn{i}")))
        configs = {f"{n} unit{'s' if n != 1 else ''}": dict(backend="ort", max_batch=16, controlnet=units[:n]) for n in range(3)}
        fps = bench_throughput(configs, frames, size, repeats)
        shares = {}
        clip = _write_clip(Path(tmp) / "clip.mkv", frames[1], size)
        base = build_settings(overrides=dict(model="demo", loop_n=2, steps=8, denoising_strength=0.5, seed=1, cfg_scale=5.0,
                                             temporal_superimpose_alpha_list="0.2,0.6,0.2"))
        for name, overrides in configs.items():
            with engine_seconds() as spent:
                time_render(replace(base, **overrides), clip, model, 1)
            shares[name] = ((spent[UNET] + spent[UNET_CONTROL]) / frames[1], spent[CONTROLNET] / frames[1])
    return {"fps": fps, "seconds": shares}


def bench_color_drift(modes: tuple[str, ...] = ("none", "original", "first"), loop_n: int = 8, frames: int = 12,
                      size: tuple[int, int] = (64, 64)) -> dict[str, list[float]]:
    """Mean colour drift after each loop pass, per `color_correction` mode, on the same clip and seed.

    Drift of a pass: the distance between each output frame's mean RGB and its input frame's, in
    8-bit levels, averaged over the frames.
    """
    from vlrt.demo.clip import sample_frames
    from vlrt.io.sources import open_source
    from vlrt.model.loading import load_model
    from vlrt.render.pipeline import render
    from vlrt.render.run_state import loop_output

    model = load_model("demo", torch.device("cpu"))
    inputs = sample_frames(frames, size)
    means_in = np.array([f.reshape(-1, 3).mean(axis=0) for f in inputs])
    drift: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        clip = _write_clip(Path(tmp) / "clip.mkv", frames, size)
        for mode in modes:
            settings = build_settings(overrides=dict(
                model="demo", backend="torch", loop_n=loop_n, steps=8, denoising_strength=0.5, cfg_scale=5.0, seed=1,
                superimpose_alpha=0.5, color_correction=mode, save_every_loop=True,
            ))
            out = str(Path(tmp) / mode) + "/"
            render(settings, str(clip), out, quiet=True, model=model)
            drift[mode] = []
            for loop in range(1, loop_n + 1):
                with open_source(out if loop == loop_n else loop_output(out, loop)) as source:
                    means = np.array([f.image.reshape(-1, 3).mean(axis=0) for f in source])
                drift[mode].append(float(np.linalg.norm(means - means_in, axis=1).mean()))
    return drift


SEGMENT_SETTINGS = dict(model="demo", backend="torch", loop_n=2, steps=4, denoising_strength=0.5, seed=1, cfg_scale=5.0,
                        temporal_superimpose_alpha_list="0.2,0.6,0.2", video_post_process_method="fastdvdnet", max_batch=1)


def bench_segments(frames: int = 48, size: tuple[int, int] = (64, 64), repeats: int = 2) -> dict:
    """Wall time of one render in one process on one thread, and on a local Ray instance in 1 and in
    2 segments (one thread each), alternated (best of `repeats`, after a warm-up of Ray's workers);
    the frames each rendered (VAE encodes per pass: `max_batch` 1 makes them one call each) and the
    largest difference from the one-process frames."""
    from vlrt.render.pipeline import render
    from vlrt.scale.distributed import import_ray, one_thread, render_segments, start_local_ray

    settings = build_settings(overrides=SEGMENT_SETTINGS)
    ray = import_ray(local=True)
    started = time.perf_counter()
    start_local_ray(ray, os.cpu_count() or 1)
    startup = time.perf_counter() - started

    def one_process(out: str):
        with one_thread():  # as each segment task computes
            return render(settings, str(clip), out, quiet=True)

    runs = {
        "one process, no Ray": one_process,
        "Ray, 1 segment": lambda out: render_segments(settings, str(clip), out, segments=1, quiet=True),
        "Ray, 2 segments": lambda out: render_segments(settings, str(clip), out, segments=2, quiet=True),
    }
    times = {name: float("inf") for name in runs}
    rendered, diffs = {}, {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            clip = _write_clip(Path(tmp) / "clip.mkv", frames, size)
            outputs = {name: f"{tmp}/out{i}/" for i, name in enumerate(runs)}
            for name, run in runs.items():  # warm-up: Ray's workers and their imports
                if name.startswith("Ray"):
                    run(outputs[name])
            for _ in range(repeats):
                for name, run in runs.items():
                    started = time.perf_counter()
                    result = run(outputs[name])
                    times[name] = min(times[name], time.perf_counter() - started)
                    rendered[name] = result.engine_calls["vae_encoder"] // settings.loop_n
            reference = _pngs(next(iter(outputs.values())))
            for name in runs:
                diffs[name] = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(_pngs(outputs[name]), reference))
    finally:
        ray.shutdown()
    return {"frames": frames, "startup": startup, "seconds": times, "rendered": rendered, "max_diff": diffs,
            "load": os.getloadavg()}


BATCHED_SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DDIM", "LCM")


def bench_sampler_steps(batch: int = 16, shape: tuple[int, ...] = (4, 64, 64), steps: int = 20, repeats: int = 3,
                        device: str = "cpu", samplers: tuple[str, ...] = BATCHED_SAMPLERS) -> dict[str, dict]:
    """Seconds per round of `batch` img2img rows (strength 1, `steps` rounds: a whole trajectory) for
    scale_model_input + noise draws + step: diffusers' schedulers one job at a time against
    `vlrt.model.sampler_steps` on the whole batch; the model output is a fixed tensor, so only the
    samplers' own work counts. Alternated, best of `repeats`; also the largest difference of the two."""
    from vlrt.demo.train import SCHEDULER_CONFIG
    from vlrt.model import sampler_steps
    from vlrt.model.samplers import make_scheduler

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    start = torch.randn((batch, *shape), generator=g).to(dev)
    output = torch.randn((batch, *shape), generator=g).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def per_job(name: str) -> torch.Tensor:
        jobs = [make_scheduler(name, SCHEDULER_CONFIG, steps) for _ in range(batch)]
        gens = [torch.Generator().manual_seed(b) for b in range(batch)]
        rows = list(start.split(1))
        for t in jobs[0].timesteps:
            for b, scheduler in enumerate(jobs):
                scheduler.scale_model_input(rows[b], t)
                rows[b] = scheduler.step(output[b : b + 1], t, rows[b], generator=gens[b], return_dict=False)[0]
        return torch.cat(rows)

    def batched(name: str) -> torch.Tensor:
        trajs = [sampler_steps.plan(name, SCHEDULER_CONFIG, steps, 1.0, dev) for _ in range(batch)]
        gens = [torch.Generator().manual_seed(b) for b in range(batch)]
        latents = start
        while not trajs[0].done:
            sampler_steps.scale_model_input(trajs, latents)
            noise = sampler_steps.draw_noise(trajs, gens, shape, dev)
            latents = sampler_steps.step(trajs, output, latents, noise)
        return latents

    results = {}
    for name in samplers:
        best = {"per job": float("inf"), "batched": float("inf")}
        ends = {}
        for _ in range(repeats):
            for label, run in (("per job", per_job), ("batched", batched)):
                sync()
                started = time.perf_counter()
                ends[label] = run(name)
                sync()
                best[label] = min(best[label], (time.perf_counter() - started) / steps)
        diff = float((ends["per job"] - ends["batched"]).abs().max())
        results[name] = {**best, "ratio": best["per job"] / best["batched"], "max_diff": diff}
    return results


def _pngs(folder: str) -> list:
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))]


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_demo_1080p(frames: int = 3) -> dict:
    """Peak memory of a user's first try: the demo model on a 1920×1080 clip, default settings but a short
    render (ONNX Runtime; its engines built in a fresh cache, as on a first run)."""
    with tempfile.TemporaryDirectory() as tmp:
        clip = _write_clip(Path(tmp) / "phone.mkv", frames, (1920, 1080))
        argv = [sys.executable, "-m", "vlrt", "render", str(clip), "-o", str(Path(tmp) / "out.mp4"), "--model", "demo",
                "--loop-n", "1", "--steps", "4", "--denoising-strength", "0.3", "--engines", str(Path(tmp) / "engines")]
        rss, seconds = peak_rss_of(argv)
        with av.open(str(Path(tmp) / "out.mp4")) as out:
            size = (out.streams.video[0].width, out.streams.video[0].height)
    return {"peak_rss_gib": rss / 2**30, "seconds": seconds, "size": size}


SECTIONS = ("throughput", "memory", "fastdvdnet", "soak", "color", "segments", "demo1080", "samplers", "controlnet",
            "occupancy", "draft")


def run(sections: list[str], out: Callable[[str], None] = print, profile: str = "h100", as_json: bool = False) -> None:
    """Run the chosen benchmark sections and print markdown tables (occupancy: JSON with `as_json`)."""
    if "occupancy" in sections and as_json:
        import json

        from vlrt.tools.occupancy import bench_occupancy

        for result in bench_occupancy(profile):
            out(json.dumps(result.as_json()))
        sections = [s for s in sections if s != "occupancy"]
        if not sections:
            return
    out(f"vlrt bench on {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}\n")
    if "throughput" in sections:
        configs = {
            "torch, batching off": dict(backend="torch", max_batch=1),
            "torch, batching on": dict(backend="torch", max_batch=16),
            "ort, batching off": dict(backend="ort", max_batch=1),
            "ort, batching on": dict(backend="ort", max_batch=16),
        }
        fps = bench_throughput(configs)
        base = fps["torch, batching off"]
        out("## Throughput (demo model, 64×64, loop_n 2, 8 steps × 0.5, CFG, 3-tap temporal; frames/s of 36 − 12 frames)\n")
        out(table([(k, f"{v:.2f}", f"{v / base:.2f}×") for k, v in fps.items()], ("configuration", "frames/s", "vs torch off")))
        out("")
        with tempfile.TemporaryDirectory() as tmp:
            fast = bench_throughput(fast_mode_configs(demo_tiny_vae(Path(tmp) / "taesd")))
        usual = next(iter(fast.values()))
        out("## Fast modes (demo model, ort, max_batch 16, 64×64, loop_n 2, × 0.5, 3-tap temporal; frames/s of 36 − 12 "
            "frames; the tiny VAE: random, TAESD's architecture at the demo's scale)\n")
        out(table([(k, f"{v:.2f}", f"{v / usual:.2f}×") for k, v in fast.items()], ("configuration", "frames/s", "vs first row")))
        vae = bench_vae_architectures()
        out("\n## One VAE encode + decode, 128×128, torch CPU, random weights (s/frame)\n")
        out(table([(k, f"{v:.3f}", f"{vae['SD VAE'] / v:.1f}×") for k, v in vae.items()], ("architecture", "s/frame", "speed vs SD VAE")))
        out("")
    if "draft" in sections:
        d = bench_draft()
        full = d["full render"]
        out("## --draft (demo model, torch, max_batch 8, 48 frames 128×128, loop_n 2, 20 steps × 0.4, CFG 7, 3-tap temporal; whole runs)\n")
        out(table([(k, f"{v:.1f}", f"{full / v:.1f}×") for k, v in d.items()], ("render", "wall (s)", "speed vs full")))
        out("")
    if "controlnet" in sections:
        r = bench_controlnet()
        off = r["fps"]["0 units"]
        out("## ControlNet units (demo model, random tiny ControlNets, ort, max_batch 16, 64×64, loop_n 2, 8 steps × 0.5, "
            "CFG; frames/s of 36 − 12 frames; engine seconds per frame of one 36-frame render)\n")
        rows = [(name, f"{v:.2f}", f"{v / off:.2f}×", f"{r['seconds'][name][0] * 1e3:.0f}", f"{r['seconds'][name][1] * 1e3:.0f}",
                 f"{r['seconds'][name][1] / r['seconds'][name][0]:.2f}") for name, v in r["fps"].items()]
        out(table(rows, ("units", "frames/s", "vs none", "UNet ms/frame", "ControlNet ms/frame", "ControlNet in UNet-equivalents")))
        out("")
    if "memory" in sections:
        m = bench_memory()
        out("## Peak memory against video length: render (demo model, 64×64, loop_n 2, file → stdout)\n")
        rows = [(n, f"{rss:.0f}", f"{s:.1f}") for n, rss, s in zip(m["frames"], m["peak_rss_mib"], m["seconds"])]
        out(table(rows, ("frames", "peak RSS (MiB)", "wall (s)")))
        out(f"\nratio {m['frames'][1]}/{m['frames'][0]} frames: {m['ratio']:.3f}\n")
    if "demo1080" in sections:
        d = bench_demo_1080p()
        out("## The demo model on a 1920×1080 clip (3 frames, loop_n 1, ort, engines built on the run)\n")
        out(table([(f"{d['size'][0]}×{d['size'][1]}", f"{d['peak_rss_gib']:.2f}", f"{d['seconds']:.1f}")],
                  ("render size chosen", "peak RSS (GiB)", "wall (s)")))
        out("")
    if "fastdvdnet" in sections:
        from vlrt.fastdvdnet.bench import bench_reuse

        r = bench_reuse(24, 96, 128)
        out("## FastDVDNet stage-1 reuse (random weights, 24 frames 96×128, CPU)\n")
        out(table([("plain network per frame", f"{r['plain_fps']:.2f}", "1.00×"),
                   ("streaming with reuse", f"{r['reuse_fps']:.2f}", f"{r['ratio']:.2f}×")],
                  ("method", "frames/s", "ratio")))
        out(f"\nmax abs difference between the two: {r['max_abs_diff']:.2e}\n")
        with tempfile.TemporaryDirectory() as tmp:
            weights = _random_fastdvdnet(Path(tmp) / "model.pth")
            m = bench_memory(60, 600, (64, 64), ("denoise", "--weights", str(weights), "--sigma", "20"))
        out("## Peak memory against video length: vlrt denoise (64×64)\n")
        rows = [(n, f"{rss:.0f}", f"{s:.1f}") for n, rss, s in zip(m["frames"], m["peak_rss_mib"], m["seconds"])]
        out(table(rows, ("frames", "peak RSS (MiB)", "wall (s)")))
        out(f"\nratio {m['frames'][1]}/{m['frames'][0]} frames: {m['ratio']:.3f}\n")
    if "color" in sections:
        drift = bench_color_drift()
        passes = [1, 2, 4, 8]
        out("## Colour drift over loop passes (demo model, 12 frames 64×64, α 0.5, 8 steps × 0.5)\n")
        out("Distance between each output frame's mean RGB and its input frame's, in 8-bit levels, mean over frames.\n")
        rows = [(mode, *(f"{d[p - 1]:.2f}" for p in passes)) for mode, d in drift.items()]
        out(table(rows, ("color_correction", *(f"after pass {p}" for p in passes))))
        out(f"\nafter pass 8: original / none = {drift['original'][-1] / drift['none'][-1]:.3f}\n")
    if "segments" in sections:
        r = bench_segments()
        one = r["seconds"]["Ray, 1 segment"]
        out(f"## Segments on a local Ray instance ({os.cpu_count()} CPUs; demo model, {r['frames']} frames 64×64, loop_n 2, "
            "3-tap temporal, FastDVDNet: reach 6; max_batch 1; one thread per process or task)\n")
        rows = [(name, f"{s:.1f}", f"{one / s:.2f}×", r["rendered"][name], f"{r['rendered'][name] / r['frames'] - 1:.1%}",
                 r["max_diff"][name]) for name, s in r["seconds"].items()]
        out(table(rows, ("configuration", "wall (s)", "speed vs 1 segment", "frames rendered", "halo / total",
                         "max diff vs one process")))
        out(f"\nRay start-up (once, not in the times above): {r['startup']:.1f} s; load average at the end: "
            f"{' '.join(f'{x:.1f}' for x in r['load'])}\n")
    if "occupancy" in sections:
        from vlrt.tools.occupancy import PROFILES, bench_occupancy

        results = bench_occupancy(profile)
        costs = ", ".join(f"{name} {a:g} + {b:g}·rows ms" for name, (a, b) in PROFILES[profile].items())
        out(f"## Occupancy against a modelled {profile} ({costs}; {results[0].frames} real 512×512 frames, "
            "3-tap temporal, max_batch 8, mp4 out)\n")
        rows = [(r.case, f"{r.occupancy:.2f}", f"{r.frames_per_s:.2f}", f"{r.device_bound_frames_per_s:.2f}",
                 f"{r.wall_s:.1f}", f"{r.busy_s:.1f}") for r in results]
        out(table(rows, ("settings", "occupancy", "frames/s", "device-bound frames/s", "wall (s)", "engines busy (s)")))
        out("")
    if "samplers" in sections:
        r = bench_sampler_steps()
        out(f"## Sampler steps: 16 rows of 4×64×64, 20 steps × 1.0, scale_model_input + noise + step per round "
            f"({torch.get_num_threads()} threads, CPU)\n")
        rows = [(name, f"{v['per job'] * 1e3:.2f}", f"{v['batched'] * 1e3:.2f}", f"{v['ratio']:.1f}×", f"{v['max_diff']:.1e}")
                for name, v in r.items()]
        out(table(rows, ("sampler", "diffusers per job (ms/round)", "batched (ms/round)", "speed-up", "max abs diff")))
        out("")
    if "soak" in sections:
        soak = ("render", "--model", "demo", "--backend", "torch", "--loop-n", "2", "--steps", "2",
                "--denoising-strength", "0.5", "--seed", "1")
        m = bench_memory(1000, 10000, (32, 32), soak)
        out("## Soak: peak memory over 1 000 and 10 000 frames (demo model, 32×32, loop_n 2)\n")
        rows = [(n, f"{rss:.0f}", f"{s:.1f}") for n, rss, s in zip(m["frames"], m["peak_rss_mib"], m["seconds"])]
        out(table(rows, ("frames", "peak RSS (MiB)", "wall (s)")))
        out(f"\nratio {m['frames'][1]}/{m['frames'][0]} frames: {m['ratio']:.3f}\n")


def _random_fastdvdnet(path: Path) -> Path:
    from vlrt.fastdvdnet.checkpoint import save_upstream_layout
    from vlrt.fastdvdnet.network import FastDVDnet

    torch.manual_seed(0)
    save_upstream_layout(FastDVDnet(), path)
    return path
