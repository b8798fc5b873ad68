"""The prepared GPU check (`tools/gpu_check.sh`): one command a lent GPU machine runs in one go.

It renders the same clip with SD 1.5's architecture (vlrt's shipped `sd1` configs, random
weights: no weights can be downloaded) at 512×512 through every backend this machine has
(torch CUDA fp16, ONNX Runtime's CUDA provider, TensorRT), and through diffusers' own
`StableDiffusionImg2ImgPipeline` in fp16 on the same GPU with the same steps, strength, guidance
and sampler, one frame per call as the extension's WebUI calls run. Frames per second are
measured as the difference between a short and a long clip, so that loading and engine builds
cancel out. Every output is checked for non-finite values (vlrt's engines refuse them; the
reference's frames are checked here). Then the `trt` and `gpu` test marks run. The result is a
markdown table headed by the GPU's name.

`--dry-run` is the same code on the CPU with the demo model's tiny shapes (CI runs it): it proves
the script works before a GPU's time is spent on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlrt.errors import VlrtError

SD1_CONFIGS = Path(__file__).resolve().parents[1] / "model" / "model_configs" / "sd1"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Work:
    """What every runner renders: one loop pass of img2img over a clip."""

    size: int
    short: int  # frames of the short clip (the long one minus this gives the per-frame cost)
    long: int
    steps: int
    strength: float = 0.5
    cfg: float = 7.0
    prompt: str = "an oil painting of a harbour"
    sampler: str = "Euler a"


FULL = Work(size=512, short=4, long=16, steps=20)
DRY = Work(size=64, short=2, long=4, steps=4)


@dataclass
class Row:
    runner: str
    precision: str
    fps: float | None = None
    finite: str = ""
    note: str = ""


def make_sd15_folder(folder: Path) -> Path:
    """A diffusers folder of SD 1.5's architecture with random weights (fp16 files) and the demo's
    byte-level tokenizer: speed does not depend on the vocabulary or on weight values."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from vlrt.demo import DEMO_MODEL_DIR

    torch.manual_seed(0)
    for name, build in (
        ("unet", lambda c: UNet2DConditionModel.from_config(c)),
        ("vae", lambda c: AutoencoderKL.from_config(c)),
    ):
        module = build(json.loads((SD1_CONFIGS / name / "config.json").read_text()))
        module.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
    text_config = CLIPTextConfig.from_pretrained(SD1_CONFIGS / "text_encoder")
    CLIPTextModel(text_config).to(torch.float16).save_pretrained(folder / "text_encoder", safe_serialization=True)
    shutil.copytree(SD1_CONFIGS / "scheduler", folder / "scheduler")
    shutil.copytree(DEMO_MODEL_DIR / "tokenizer", folder / "tokenizer")
    shutil.copy(SD1_CONFIGS / "model_index.json", folder / "model_index.json")
    return folder


def _clip(folder: Path, frames: int, size: int) -> Path:
    from vlrt.demo.clip import sample_frames

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(sample_frames(frames, (size, size))):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    return folder


def per_frame_rate(run: Callable[[int], None], work: Work) -> float:
    """Frames per second from a short and a long run after a warm-up (which builds what it needs)."""
    run(work.short)
    times = {}
    for frames in (work.short, work.long):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(frames)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times[frames] = time.perf_counter() - start
    return (work.long - work.short) / max(times[work.long] - times[work.short], 1e-9)


def diffusers_row(model: Path, clips: dict[int, Path], work: Work, device: torch.device, dtype: torch.dtype) -> Row:
    """diffusers' img2img pipeline, one frame per call, same sampler and settings."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        model, local_files_only=True, safety_checker=None, requires_safety_checker=False, dtype=dtype
    ).to(device)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    bad = []

    def run(frames: int) -> None:
        for i, path in enumerate(sorted(clips[frames].glob("*.png"))):
            out = pipe(prompt=work.prompt, image=Image.open(path).convert("RGB"), strength=work.strength,
                       num_inference_steps=work.steps, guidance_scale=work.cfg,
                       generator=torch.Generator("cpu").manual_seed(i), output_type="np").images
            if not np.isfinite(out).all():
                bad.append(i)

    row = Row("diffusers StableDiffusionImg2ImgPipeline", _precision(dtype))
    row.fps = per_frame_rate(run, work)
    row.finite = "yes" if not bad else f"NO ({len(bad)} frames)"
    return row


def vlrt_row(backend: str, model: Path, clips: dict[int, Path], work: Work, device: torch.device,
             precision: str, engines: Path, out: Path) -> Row:
    """vlrt's render of the same clips on one backend; a backend this machine lacks gets a row saying why.
    The VAE runs in the reference's precision (vlrt's own default on a large GPU is fp32)."""
    from vlrt.render.pipeline import open_model, render
    from vlrt.settings.config import build_settings

    row = Row(f"vlrt --backend {backend}", precision)
    why = _unavailable(backend, device)
    if why:
        row.note = f"not run: {why}"
        return row
    settings = build_settings(overrides=dict(
        model=str(model), loop_n=1, steps=work.steps, denoising_strength=work.strength, cfg_scale=work.cfg,
        prompt=work.prompt, sampler_name=work.sampler, seed=1, backend=backend, device=device.type,
        precision=precision, vae_precision=precision, engines=str(engines), max_batch=16,
    ))
    loaded = open_model(settings, device)  # once: the runs differ in frames only
    calls: dict[str, int] = {}

    def run(frames: int) -> None:
        result = render(settings, str(clips[frames]), str(out / f"{backend}-{frames}.mp4"), quiet=True, model=loaded)
        calls.update(result.engine_calls)

    try:
        row.fps = per_frame_rate(run, work)
    except VlrtError as err:  # a non-finite engine output among them
        row.finite, row.note = ("NO" if "NaN" in str(err) else "?"), str(err)
        return row
    row.finite = "yes"
    row.note = f"UNet calls per long run: {calls.get('unet', 0)}"
    return row


def _unavailable(backend: str, device: torch.device) -> str:
    if backend == "trt":
        from vlrt.engines.trt_engine import trt_available

        ok, why = trt_available()
        return "" if ok else why
    if backend == "ort" and device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime-gpu is not installed (no CUDA provider)"
    return ""


def _precision(dtype: torch.dtype) -> str:
    return "fp16" if dtype == torch.float16 else "fp32"


def _free() -> None:
    """Hand the previous runner's cached GPU memory back before the next one starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_marked_tests(timeout: int) -> str:
    """`pytest -m "trt or gpu"`'s summary line."""
    command = [sys.executable, "-m", "pytest", "-m", "trt or gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout} s"
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else f"exit status {done.returncode}, no output"


def markdown(device_line: str, work: Work, model_line: str, rows: list[Row], tests: str) -> str:
    """The report: what ran where, one row per runner, frames/s and the ratio to diffusers."""
    base = rows[0].fps
    lines = [
        "# vlrt GPU check",
        "",
        f"- Device: {device_line}",
        f"- Model: {model_line}",
        f"- Work: {work.size}×{work.size}, {work.sampler}, {work.steps} steps × strength {work.strength} "
        f"= {int(work.steps * work.strength)} denoising steps per frame, CFG {work.cfg}, one loop pass; "
        f"frames/s from {work.long} frames minus {work.short}",
        f"- `pytest -m \"trt or gpu\"`: {tests}",
        "",
        "| runner | precision | frames/s | vs diffusers | finite outputs | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        fps = f"{row.fps:.2f}" if row.fps else "—"
        ratio = f"{row.fps / base:.2f}×" if row.fps and base else "—"
        lines.append(f"| {row.runner} | {row.precision} | {fps} | {ratio} | {row.finite or '—'} | {row.note} |")
    return "\n".join(lines) + "\n"


def _device_line(device: torch.device) -> str:
    versions = f"torch {torch.__version__}"
    if device.type != "cuda":
        return f"CPU (dry run: tiny shapes), {versions}"
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
            f"{versions} (CUDA {torch.version.cuda})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same check on the CPU with tiny shapes")
    parser.add_argument("--out", default="gpu_check.md", help="markdown report to write")
    parser.add_argument("--backends", default="torch,ort,trt", help="vlrt backends to measure")
    parser.add_argument("--test-timeout", type=int, default=240, help="seconds for the trt/gpu test marks")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA GPU; run with --dry-run to check the script on the CPU")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    work = DRY if args.dry_run else FULL
    dtype = torch.float32 if args.dry_run else torch.float16
    with tempfile.TemporaryDirectory(prefix="vlrt-gpu-check-") as scratch:
        root = Path(scratch)
        if args.dry_run:
            from vlrt.demo import DEMO_MODEL_DIR

            model, model_line = DEMO_MODEL_DIR, "the built-in demo model (tiny)"
        else:
            model, model_line = make_sd15_folder(root / "sd15"), "SD 1.5 architecture (vlrt's sd1 configs), random weights"
        clips = {n: _clip(root / f"clip{n}", n, work.size) for n in (work.short, work.long)}
        rows = [diffusers_row(model, clips, work, device, dtype)]
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            _free()
            rows.append(vlrt_row(backend, model, clips, work, device, _precision(dtype), root / "engines", root))
        tests = "not run (dry run)" if args.dry_run else run_marked_tests(args.test_timeout)
    report = markdown(_device_line(device), work, model_line, rows, tests)
    Path(args.out).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
