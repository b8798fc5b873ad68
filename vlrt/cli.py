"""The `vlrt` command: argument parsing and the one place errors become exit statuses.

Render settings are generated from `Settings` (one `--kebab-case` option per field), so the
command line, the config file and the settings file can never disagree about a name.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from vlrt import __version__
from vlrt.errors import OutputClosed, VlrtError
from vlrt.settings.config import Settings, build_settings, field_default, load_config


def _type_of(annotation: str) -> Any:
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


IO_SETTINGS = (
    "max_frames", "extract_nth_frame", "output_frame_rate", "crf", "lossless", "codec", "output_format",
    "input_format", "input_size", "input_fps", "device", "max_batch", "blend_rounding", "backend", "precision", "engines",
)


def add_settings_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One option per setting (or per named setting); only options actually given override the config file."""
    group = parser.add_argument_group("settings (also accepted in --config TOML with snake_case names)")
    for f in fields(Settings):
        if names is not None and f.name not in names:
            continue
        flags = ["--" + f.name.replace("_", "-")]
        if f.metadata["alias"]:
            flags.append("--" + f.metadata["alias"].replace("_", "-"))
        help_text = f"{f.metadata['help']} (default: {field_default(f.name)!r})"
        if f.type.startswith("bool"):
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif f.type.startswith("list"):
            group.add_argument(*flags, dest=f.name, action="append", default=argparse.SUPPRESS, metavar=f.name.upper(),
                               help=help_text + "; given on the command line, replaces the config's list")
        else:
            group.add_argument(
                *flags,
                dest=f.name,
                type=_type_of(f.type),
                choices=f.metadata["choices"],
                default=argparse.SUPPRESS,
                metavar=f.name.upper() if not f.metadata["choices"] else None,
                help=help_text,
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    config = load_config(Path(args.config)) if getattr(args, "config", None) else {}
    overrides = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    return build_settings(config, overrides)


def _render(args: argparse.Namespace) -> int:
    preview = Path(args.preview) if args.preview else None
    if args.report and args.output == "-":
        raise VlrtError("--report needs a file or folder output to read back; drop --report when writing to a pipe")
    settings = settings_from_args(args)
    from vlrt.render.run_state import check_outputs

    check_outputs(settings, args.input, args.output, preview=args.preview, no_overwrite=args.no_overwrite, resume=args.resume)
    if args.segments is not None:
        if settings.draft:
            raise VlrtError("--draft renders in one process: drop --segments (a draft is the quick look before the long render)")
        from vlrt.render.pipeline import preview_from_output
        from vlrt.scale.distributed import render_segments

        result = render_segments(settings, args.input, args.output, segments=args.segments, ray_address=args.ray or "auto",
                                 gpus_per_segment=args.gpus_per_segment, quiet=args.quiet, resume=args.resume)
        if preview is not None:
            preview_from_output(result.settings, args.input, args.output, preview)
    else:
        from vlrt.render.pipeline import render

        if args.ray is not None or args.gpus_per_segment is not None:
            raise VlrtError("--ray and --gpus-per-segment apply only to segmented renders: add --segments N")
        render(settings, args.input, args.output, quiet=args.quiet, preview=preview, resume=args.resume)
    if args.report:
        from vlrt.tools.report import format_summary, report_beside_output

        report = report_beside_output(
            args.output, args.input, extract_nth_frame=settings.extract_nth_frame, max_frames=settings.max_frames
        )
        if not args.quiet:
            print(format_summary(report), file=sys.stderr)
    return 0


def _preview(args: argparse.Namespace) -> int:
    import itertools

    from vlrt.render.pipeline import open_model, pick_device, render_span
    from vlrt.render.preview import apply_sweep, parse_sweep, sweep_grid

    settings = settings_from_args(args)
    from vlrt.io.output_guard import refuse_overwriting_sources

    refuse_overwriting_sources([(args.output, False)], [("input", args.input)])
    try:
        frames = [int(f) for f in args.frames.split(",") if f.strip()]
    except ValueError:
        raise VlrtError(f"--frames {args.frames!r} is not a list of frame numbers, e.g. 0,24,48") from None
    sweeps = [parse_sweep(s) for s in args.sweep]
    for name, values in sweeps:
        if name in MODEL_SETTINGS:
            raise VlrtError(f"--sweep {name}: the model is loaded once per preview; run one preview per {name} instead")
        for value in values:
            apply_sweep(settings, name, value)  # an unknown name or a wrongly typed value fails before any work
    model = open_model(settings, pick_device(settings.device))
    combos = []
    for values in itertools.product(*[v for _, v in sweeps]) if sweeps else [()]:
        changes = dict(zip([n for n, _ in sweeps], values))
        label = " ".join(f"{k}={v}" for k, v in changes.items()) or "settings"
        label += " (DRAFT)" if settings.draft else ""
        swept = settings
        for name, value in changes.items():
            swept = apply_sweep(swept, name, value)
        combos.append((label, swept))

    def render_frame(s: Settings, f: int) -> dict:
        pictures: dict = {}
        render_span(s, args.input, f, f + 1, model=model, every_pass=args.show_loops,
                    on_frame=lambda p, frame: pictures.__setitem__(p, frame.image))
        if not pictures:
            raise VlrtError(f"frame {f} is past the end of {args.input}: choose --frames within the video")
        return pictures

    sheet = sweep_grid(combos, frames, render_frame, args.show_loops)
    out = Path(args.output)
    tmp = out.with_name(out.name + ".partial.png")
    sheet.save(tmp)
    tmp.replace(out)
    if not args.quiet:
        draft = ", a DRAFT: half size, a quarter of the steps" if settings.draft else ""
        print(f"vlrt: wrote {out} ({len(combos)} settings × {len(frames)} frames{draft})", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from vlrt.tools import bench

    sections = args.sections or ["throughput", "memory", "fastdvdnet"]
    unknown = set(sections) - set(bench.SECTIONS)
    if unknown:
        raise VlrtError(f"unknown bench section(s) {', '.join(sorted(unknown))}: choose from {', '.join(bench.SECTIONS)}")
    bench.run(sections, profile=args.profile, as_json=args.json)
    return 0


def _denoise(args: argparse.Namespace) -> int:
    from vlrt.render.pipeline import denoise

    settings = build_settings(
        {},
        {
            **{f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)},
            "fastdvdnet_weights": args.weights,
            "fastdvdnet_noise_sigma": args.sigma,
            "video_post_process_alpha": args.alpha,
        },
    )
    from vlrt.render.run_state import check_outputs

    check_outputs(settings, args.input, args.output, no_overwrite=args.no_overwrite)
    denoise(settings, args.input, args.output, quiet=args.quiet)
    return 0


def _export(args: argparse.Namespace) -> int:
    from vlrt.model.controlnet import load_controlnets
    from vlrt.render.engine_picker import (
        build_engines,
        control_networks,
        default_engines_dir,
        fastdvdnet_networks,
        precision_for,
        resolve_backend,
        sd_networks,
        vae_precision_for,
    )
    from vlrt.render.pipeline import fastdvdnet_network, open_model, pick_device

    settings = settings_from_args(args)
    device = pick_device(settings.device)
    backend = resolve_backend("ort" if settings.backend == "torch" else settings.backend, device)
    wanted = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = set(wanted) - set(EXPORT_COMPONENTS)
    if unknown:
        raise VlrtError(f"unknown component(s) {', '.join(sorted(unknown))}: choose from {', '.join(EXPORT_COMPONENTS)}")
    if settings.width is None or settings.height is None:
        raise VlrtError("vlrt export needs --width and --height (engines are built for one resolution)")
    precision = precision_for(backend, device, settings.precision)
    networks, control = [], []
    if any(c != "fastdvdnet" for c in wanted):
        model = open_model(settings, device)
        networks += [n for n in sd_networks(model, settings.height, settings.width) if n.component in wanted]
        if settings.controlnet and "unet" in wanted:  # the UNet with residual inputs, and each unit's ControlNet
            nets = [c.network for c in load_controlnets(settings.controlnet, model)]
            control = control_networks(model, nets, settings.height, settings.width)
    if "fastdvdnet" in wanted:
        net = fastdvdnet_network(settings.fastdvdnet_weights, settings.model == "demo", _log(args))
        networks += fastdvdnet_networks(net, settings.height, settings.width)
    engines = {}
    groups = [("", networks + control[:1]), *((f"_{i}", [net]) for i, net in enumerate(control[1:]))]
    for label, nets in groups:  # each ControlNet on its own: their engines share a component name
        built = build_engines(
            nets, backend, device=device, max_batch=settings.max_batch, precision=precision,
            engines_dir=Path(settings.engines) if settings.engines else default_engines_dir(), log=_log(args),
            vae_precision=vae_precision_for(device, settings.vae_precision, precision),
        )
        engines.update({name + label: engine for name, engine in built.items()})
    for name, engine in engines.items():
        print(f"{name}: {getattr(engine, 'path', '')}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    try:
        from vlrt.ui.app import serve
    except ModuleNotFoundError as exc:
        if exc.name != "gradio":
            raise
        raise VlrtError("vlrt ui needs Gradio: pip install 'vlrt[ui]' (or make setup)") from None
    serve(args.host, args.port)
    return 0


def _log(args: argparse.Namespace):
    return (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))


NO_OVERWRITE_HELP = "refuse (before any work) when an output file exists already, instead of replacing it"
EXPORT_COMPONENTS = ("unet", "vae_encoder", "vae_decoder", "fastdvdnet")
# Settings applied when the model is loaded (see pipeline.open_model), which a preview does once.
MODEL_SETTINGS = (
    "model", "model_config", "prediction_type", "vae", "lora", "lora_dir", "embeddings_dir", "clip_skip", "draft", "draft_vae",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlrt", description="Streaming video loopback renderer for Stable Diffusion img2img.")
    parser.add_argument("--version", action="version", version=f"vlrt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser("render", help="render a video through SD img2img loopback")
    render.add_argument("input", help="video file, image folder, one image, or '-' for standard input")
    render.add_argument("-o", "--output", required=True, help="video file, folder/ of PNGs, or '-' for standard output")
    render.add_argument("--config", help="TOML file of settings (command-line options override it)")
    render.add_argument("-q", "--quiet", action="store_true", help="no progress or messages on standard error")
    render.add_argument("--preview", help="also write a PNG of a few input frames above the same frames rendered")
    render.add_argument("--report", action="store_true",
                        help="also measure the output's flicker against the input (writes <output>.flicker.png/.json)")
    render.add_argument("--resume", action="store_true",
                        help="continue an interrupted render of the same output with the same settings")
    render.add_argument("-n", "--no-overwrite", action="store_true", help=NO_OVERWRITE_HELP)
    scale = render.add_argument_group("segment-parallel rendering on Ray (needs pip install 'vlrt[ray]'; the same frames)")
    scale.add_argument("--segments", type=int, metavar="N",
                       help="split the input into N contiguous segments, each rendered by its own Ray task")
    scale.add_argument("--ray", metavar="auto|ADDRESS",
                       help="auto (the default): start a local Ray instance and stop it at the end; ADDRESS: use that cluster")
    scale.add_argument("--gpus-per-segment", type=float, metavar="G",
                       help="GPUs per segment task (default: 1 where the cluster has GPUs, else 0; a fraction shares a GPU)")
    add_settings_arguments(render)
    render.set_defaults(run=_render)

    prev = commands.add_parser("preview", help="render a few frames for every combination of swept settings into one grid")
    prev.add_argument("input", help="video file, image folder or one image")
    prev.add_argument("-o", "--output", required=True, help="the grid PNG")
    prev.add_argument("--frames", default="0", help="comma-separated frame numbers (0-based), e.g. 0,24,48")
    prev.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                      help="a setting and its values (repeatable; use | between values that hold commas)")
    prev.add_argument("--show-loops", action="store_true", help="one row per loop pass, not only the last")
    prev.add_argument("--config", help="TOML file of settings (command-line options override it)")
    prev.add_argument("-q", "--quiet", action="store_true", help="no messages on standard error")
    add_settings_arguments(prev)
    prev.set_defaults(run=_preview)

    export = commands.add_parser("export", help="build engines (ONNX, and TensorRT plans where present) into the engine cache")
    export.add_argument("--components", default="unet,vae_encoder,vae_decoder",
                        help=f"comma-separated, from {', '.join(EXPORT_COMPONENTS)} (default: SD's three)")
    export.add_argument("-q", "--quiet", action="store_true", help="no progress or messages on standard error")
    add_settings_arguments(export, ("model", "model_config", "prediction_type", "vae", "lora", "width", "height", "max_batch",
                                    "precision", "vae_precision", "engines", "backend", "device",
                                    "fastdvdnet_weights", "controlnet"))
    export.set_defaults(run=_export, config=None)

    den = commands.add_parser("denoise", help="FastDVDNet alone over a video (no synthetic noise: it denoises what it gets)")
    den.add_argument("input", help="video file, image folder, one image, or '-' for standard input")
    den.add_argument("-o", "--output", required=True, help="video file, folder/ of PNGs, or '-' for standard output")
    den.add_argument("--weights", required=True, help="FastDVDnet weights: upstream model.pth (github.com/m-tassano/fastdvdnet) or .safetensors")
    den.add_argument("--sigma", type=float, default=20.0, help="noise level of the input on the 0-255 scale (trained for 5-55; default 20)")
    den.add_argument("--alpha", type=float, default=1.0, help="weight of the denoised frame over the input (default 1: denoised only)")
    den.add_argument("-q", "--quiet", action="store_true", help="no progress or messages on standard error")
    den.add_argument("-n", "--no-overwrite", action="store_true", help=NO_OVERWRITE_HELP)
    add_settings_arguments(den, IO_SETTINGS)
    den.set_defaults(run=_denoise)

    bench = commands.add_parser("bench", help="speed and memory, measured side by side in one run (markdown tables)")
    bench.add_argument("sections", nargs="*",
                       help="throughput, memory, fastdvdnet, soak, color, segments, demo1080, samplers, controlnet, "
                            "occupancy, draft (default: the first three)")
    bench.add_argument("--profile", default="h100", choices=("h100", "rtx4090"),
                       help="occupancy: the modelled GPU's engine times (default h100)")
    bench.add_argument("--json", action="store_true", help="occupancy: print one JSON object per case instead of a table")
    bench.set_defaults(run=_bench)

    ui = commands.add_parser("ui", help="the extension's panel in a browser: tune, preview and run renders (needs vlrt[ui])")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: loopback only; any other lets whoever reaches it render and read files)")
    ui.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    ui.set_defaults(run=_ui)

    from vlrt.tools.doctor import add_doctor_parser
    from vlrt.tools.report import add_report_parser

    add_report_parser(commands)
    add_doctor_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "quiet", False))
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        return args.run(args)
    except OutputClosed as exc:
        _silence_stdout()
        print(f"vlrt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except VlrtError as exc:
        print(f"vlrt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        hint = " (finished frames are kept: run the same command with --resume to continue)" if args.command == "render" else ""
        print(f"vlrt: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        print("vlrt: error: output pipe closed by the reader", file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM stops a render the way Ctrl-C does: cleanly, keeping what is finished."""
    raise KeyboardInterrupt


def _configure_logging(quiet: bool) -> None:
    """Show vlrt's own progress messages (engine exports and builds) on standard error."""
    logger = logging.getLogger("vlrt")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vlrt: %(message)s"))
        logger.addHandler(handler)


def _silence_stdout() -> None:
    """After the reader of standard output went away, point it at /dev/null so Python's exit-time
    flush does not print a second error."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
