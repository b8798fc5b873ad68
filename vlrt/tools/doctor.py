"""`vlrt doctor`: one screen of what this machine has for vlrt, and which backend is fastest here.

Every probe imports its library lazily and turns any failure into a line of text: the command
exists to explain a broken or partial install, so it must never be the thing that crashes.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from vlrt import __version__

ENCODERS = ("libx264", "libx264rgb", "ffv1", "libvpx-vp9", "aac")
FFMPEG_LIBRARIES = ("libavcodec", "libavformat", "libavutil")
LABEL_WIDTH = 14


@dataclass
class Findings:
    """What the probes learnt that decides the advice at the end."""

    torch: bool = False
    cuda: bool = False
    ort: bool = False
    ort_cuda: bool = False
    trt: bool = False
    polygraphy: bool = False
    gpu_names: list[str] = field(default_factory=list)


def _import(name: str) -> tuple[ModuleType | None, str]:
    """The module, or None and the first line of why it would not import (any exception at all)."""
    try:
        return importlib.import_module(name), ""
    except Exception as err:  # a broken wheel raises OSError, RuntimeError, ... not only ImportError
        text = str(err).strip().splitlines()
        return None, text[0] if text else type(err).__name__


def _line(label: str, text: str) -> str:
    return f"{label + ':':<{LABEL_WIDTH}}{text}"


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while n >= 1024 and step < len(units) - 1:
        n /= 1024
        step += 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {units[step]}"


def _python() -> list[str]:
    return [
        _line("Python", f"{platform.python_version()} ({sys.executable})"),
        _line("vlrt", __version__),
    ]


def _torch(found: Findings) -> list[str]:
    torch, why = _import("torch")
    if torch is None:
        return [_line("torch", f"not installed ({why}); vlrt needs it: pip install torch")]
    found.torch = True
    cuda_build = getattr(torch.version, "cuda", None)
    hip_build = getattr(torch.version, "hip", None)
    build = f"CUDA {cuda_build} build" if cuda_build else f"ROCm {hip_build} build" if hip_build else "CPU-only build"
    lines = [_line("torch", f"{torch.__version__} ({build})")]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        reason = "a CPU-only build of torch" if not (cuda_build or hip_build) else "no driver or device visible"
        return lines + [_line("CUDA", f"no CUDA GPU ({reason})")]
    found.cuda = True
    lines.append(_line("CUDA", f"available, {count} GPU{'s' if count > 1 else ''}"))
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        found.gpu_names.append(props.name)
        lines.append(_line(
            f"GPU {index}", f"{props.name}, {_size(props.total_memory)}, compute capability {props.major}.{props.minor}"
        ))
    return lines


def _onnxruntime(found: Findings) -> list[str]:
    ort, why = _import("onnxruntime")
    if ort is None:
        return [_line("ONNX Runtime", f"missing ({why}): pip install onnxruntime (or onnxruntime-gpu)")]
    found.ort = True
    providers = list(ort.get_available_providers())
    found.ort_cuda = "CUDAExecutionProvider" in providers
    return [_line("ONNX Runtime", f"{ort.__version__}, providers: {', '.join(providers)}")]


def _tensorrt(found: Findings) -> list[str]:
    """TensorRT counts only when a runtime starts on the GPU (importing it proves little), and
    polygraphy only from 0.49.1."""
    from vlrt.engines.trt_engine import polygraphy_problem, runtime_problem

    trt, why = _import("tensorrt")
    if trt is None:
        trt_line = _line("TensorRT", f"not installed (import tensorrt: {why})")
    else:
        version = str(getattr(trt, "__version__", "importable, version unknown"))
        problem = runtime_problem(trt) if found.cuda else "no CUDA GPU to run it on"
        found.trt = problem is None
        trt_line = _line("TensorRT", version if problem is None else f"{version}, unusable: {problem}")
    polygraphy, _ = _import("polygraphy")
    problem = polygraphy_problem() if polygraphy is not None else None
    if polygraphy is None:
        poly_line = _line("polygraphy", "not installed (builds TensorRT plans)")
    elif problem is not None:
        poly_line = _line("polygraphy", f"{problem}: pip install -U polygraphy")
    else:
        found.polygraphy = True
        poly_line = _line("polygraphy", str(getattr(polygraphy, "__version__", "installed")))
    return [trt_line, poly_line]


def _encoder(av: ModuleType, name: str) -> bool:
    try:
        av.Codec(name, "w")
        return True
    except Exception:  # PyAV's UnknownCodecError, or an older PyAV's own types
        return False


def _pyav() -> list[str]:
    av, why = _import("av")
    if av is None:
        return [_line("PyAV", f"not installed ({why}); vlrt reads and writes video with it: pip install av")]
    versions = getattr(av, "library_versions", {})
    libraries = ", ".join(
        f"{name} {'.'.join(map(str, versions[name]))}" for name in FFMPEG_LIBRARIES if name in versions
    )
    ffmpeg = getattr(av, "ffmpeg_version_info", "")
    return [
        _line("PyAV", f"{av.__version__}, bundled FFmpeg {ffmpeg}".rstrip() + (f" ({libraries})" if libraries else "")),
        _line("encoders", ", ".join(f"{name} {'yes' if _encoder(av, name) else 'NO'}" for name in ENCODERS)),
    ]


def _system_ffmpeg() -> list[str]:
    where = shutil.which("ffmpeg")
    found = f"on PATH at {where}" if where else "not on PATH"
    return [_line("ffmpeg", f"{found} (vlrt does not need it: PyAV brings its own FFmpeg libraries)")]


def _engine_cache(root: Path) -> list[str]:
    if not root.is_dir():
        return [_line("engine cache", f"{root} does not exist yet (filled by vlrt export or --backend ort/trt)")]
    entries = [
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "manifest.json").is_file()
    ]
    total = sum(f.stat().st_size for d in entries for f in d.rglob("*") if f.is_file())
    if not entries:
        return [_line("engine cache", f"{root}: no engines yet")]
    plans = sum(1 for d in entries if (d / "model.plan").is_file())
    count = f"{len(entries)} engine{'s' if len(entries) > 1 else ''}"
    return [_line("engine cache", f"{root}: {count} ({plans} with TensorRT plans), {_size(total)}")]


def advice(found: Findings) -> list[str]:
    """The fastest backend this machine can run, and what to install for a faster one (TensorRT's
    wheel for torch's CUDA version)."""
    if not found.torch:
        return ["fastest backend here: none: vlrt needs torch (pip install torch)"]
    from vlrt.engines.trt_engine import install_command

    trt_install = install_command()
    if found.cuda and found.trt:
        lines = [f"fastest backend here: --backend trt (TensorRT on {found.gpu_names[0]}; auto picks it)"]
        if not found.polygraphy:
            lines.append("to build new TensorRT plans: pip install -U polygraphy (0.49.1 or later)")
        return lines
    if found.cuda:
        other = " (or --backend ort: its CUDA provider is installed)" if found.ort_cuda else ""
        return [
            f"fastest backend here: --backend torch on the GPU{other}",
            f"for a faster one: TensorRT: {trt_install}; then --backend trt",
        ]
    first = (
        "fastest backend here: CPU only: --backend ort is the fastest CPU path"
        if found.ort
        else "fastest backend here: CPU only: --backend torch (pip install onnxruntime for the faster --backend ort)"
    )
    return [first, f"for a faster one: an NVIDIA GPU with a CUDA build of torch, then TensorRT: {trt_install}"]


def _guarded(label: str, probe: Callable[[], list[str]]) -> list[str]:
    """A probe's lines, or one line saying it failed: a surprise in one library must not hide the rest."""
    try:
        return probe()
    except Exception as err:
        return [_line(label, f"could not check ({type(err).__name__}: {err})")]


def doctor_lines(engines: Path) -> list[str]:
    """Everything `vlrt doctor` prints."""
    found = Findings()
    probes: list[tuple[str, Callable[[], list[str]]]] = [
        ("Python", _python),
        ("torch", lambda: _torch(found)),
        ("ONNX Runtime", lambda: _onnxruntime(found)),
        ("TensorRT", lambda: _tensorrt(found)),
        ("PyAV", _pyav),
        ("ffmpeg", _system_ffmpeg),
        ("engine cache", lambda: _engine_cache(engines)),
    ]
    lines = ["vlrt doctor"]
    for label, probe in probes:
        lines += _guarded(label, probe)
    return lines + advice(found)


def run_doctor(args: argparse.Namespace) -> int:
    """`vlrt doctor`: print the findings; always exit 0 (it reports, it does not judge)."""
    from vlrt.render.engine_picker import default_engines_dir

    print("\n".join(doctor_lines(Path(args.engines) if args.engines else default_engines_dir())))
    return 0


def add_doctor_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `vlrt doctor` to the command line's subcommands."""
    parser = commands.add_parser(
        "doctor", help="what this machine has for vlrt (GPU, TensorRT, ONNX Runtime, FFmpeg) and the fastest backend"
    )
    parser.add_argument(
        "--engines", default="", metavar="DIR",
        help="engine cache folder to inspect (default: $VLRT_ENGINES, the checkout's engines/, or ~/.cache/vlrt/engines)"
    )
    parser.set_defaults(run=run_doctor)
    return parser
