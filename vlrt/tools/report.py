"""Temporal stability of a rendered video: how much each frame changes from the one before.

Flicker is the mean absolute change between consecutive frames (0-255 scale, over every pixel
and channel). Motion in the source changes frames too, so when the input the video was
rendered from is given, its own change is measured the same way and subtracted frame by
frame: what is left, the "excess flicker", is what the render added. Frames are streamed,
so memory holds two frames of each clip and one number per frame, whatever the length.

At a scene cut the frame changes by design: the cuts (those the render recorded in its settings
file, or given) are marked on the plot and their changes left out of the summary figures.

Plot and JSON files for a folder of frames go beside the folder (`out.flicker.png` for
`out/`), never inside it: a PNG inside would be read back as one more frame.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from vlrt.errors import VlrtError
from vlrt.image.scene_cuts import parse_cut_list
from vlrt.io.sources import open_source
from vlrt.render.run_state import recorded_cuts

PLOT_SUFFIX = ".flicker.png"
JSON_SUFFIX = ".flicker.json"


@dataclass(frozen=True)
class Report:
    """Per-frame changes of a video (and of its input); entry i compares frame i+1 with frame i."""

    video: str
    against: str | None
    width: int
    height: int
    flicker: tuple[float, ...]
    input_change: tuple[float, ...] | None = None
    cuts: tuple[int, ...] = ()  # first frames of new shots: their change from the frame before is not flicker

    @property
    def frame_count(self) -> int:
        return len(self.flicker) + 1

    @property
    def excess(self) -> tuple[float, ...] | None:
        """Output change minus input change: negative where the render is calmer than its source."""
        if self.input_change is None:
            return None
        return tuple(out - src for out, src in zip(self.flicker, self.input_change))

    def summary(self) -> dict[str, float | int | None]:
        """Frame count, and mean and 95th percentile of each per-frame series (None without an input),
        the changes into a cut's first frame left out."""
        numbers: dict[str, float | int | None] = {"frame_count": self.frame_count, "cuts": len(self.cuts)}
        kept = [i for i in range(len(self.flicker)) if i + 1 not in self.cuts] or list(range(len(self.flicker)))
        for name, values in (("flicker", self.flicker), ("input_change", self.input_change), ("excess", self.excess)):
            chosen = None if values is None else [values[i] for i in kept]
            numbers[f"mean_{name}"] = None if chosen is None else round(float(np.mean(chosen)), 4)
            numbers[f"p95_{name}"] = None if chosen is None else round(float(np.percentile(chosen, 95)), 4)
        return numbers

    def to_dict(self) -> dict:
        """Everything, JSON-ready; per-frame lists are indexed by the later frame of each pair (from 1)."""
        series = {"flicker": self.flicker, "input_change": self.input_change, "excess": self.excess}
        return {
            "video": self.video,
            "against": self.against,
            "width": self.width,
            "height": self.height,
            "summary": self.summary(),
            "cuts": list(self.cuts),
            "per_frame": {
                "frame": list(range(1, self.frame_count)),
                **{name: None if v is None else [round(x, 4) for x in v] for name, v in series.items()},
            },
        }


def _change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 pictures, 0-255."""
    return float(np.abs(np.subtract(a, b, dtype=np.int16)).mean())


def _length_mismatch(video: str, video_frames: int, against: str, input_frames: int) -> VlrtError:
    return VlrtError(
        f"'{video}' has {video_frames} frames but '{against}' has {input_frames}: compare a render with the "
        "input it was rendered from, read the same way (--extract-nth-frame, --max-frames)"
    )


def _resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def flicker_report(
    video: str,
    against: str | None = None,
    *,
    extract_nth_frame: int = 1,
    max_frames: int | None = None,
    show_progress: bool = False,
    cuts: tuple[int, ...] = (),
) -> Report:
    """Measure `video` frame to frame, and `against` (its input) too when given; `cuts` are the
    first frames of new shots (marked, and left out of the summary).

    `extract_nth_frame` and `max_frames` say how the render read `against`, so its frames line
    up with the video's. Input frames of another size are resized (stretched) to the video's,
    which keeps the two changes on one scale. Frame counts that differ are a VlrtError naming
    both; so is a video of one frame (flicker needs two).
    """
    if video == "-" and against == "-":
        raise VlrtError("the video and --against cannot both be standard input: save one of them to a file")
    with ExitStack() as stack:
        out = stack.enter_context(open_source(video))
        src = None
        if against is not None:
            src = stack.enter_context(open_source(against, extract_nth_frame=extract_nth_frame, max_frames=max_frames))
        width, height = out.info.width, out.info.height
        bar = stack.enter_context(
            tqdm(
                total=out.info.frame_count, unit="frame", desc="report", file=sys.stderr, dynamic_ncols=True,
                disable=not (show_progress and sys.stderr.isatty()),
            )
        )
        flicker: list[float] = []
        input_change: list[float] = []
        inputs: Iterator | None = iter(src) if src is not None else None
        previous = previous_input = None
        count = 0
        frames = iter(out)
        for frame in frames:
            count += 1
            if (frame.width, frame.height) != (width, height):
                raise VlrtError(
                    f"frame {frame.index} of '{video}' is {frame.width}x{frame.height}, not {width}x{height} like "
                    "its first frame: a video's frames must all have one size"
                )
            if inputs is not None:
                source = next(inputs, None)
                if source is None:
                    raise _length_mismatch(video, count + sum(1 for _ in frames), against, count - 1)
                current_input = _resized(source.image, width, height)
                if previous_input is not None:
                    input_change.append(_change(current_input, previous_input))
                previous_input = current_input
            if previous is not None:
                flicker.append(_change(frame.image, previous))
            previous = frame.image
            bar.update()
        if inputs is not None:
            extra = sum(1 for _ in inputs)
            if extra:
                raise _length_mismatch(video, count, against, count + extra)
    if count < 2:
        raise VlrtError(f"'{video}' has only one frame: flicker is the change between frames, so it needs two or more")
    inside = tuple(c for c in cuts if 0 < c < count)
    return Report(video, against, width, height, tuple(flicker), tuple(input_change) if src is not None else None, inside)


def _label(spec: str) -> str:
    return "standard input" if spec == "-" else spec


def format_summary(report: Report) -> str:
    """A few lines for the terminal: what was measured and its mean and 95th percentile."""
    numbers = report.summary()
    lines = [f"flicker of {_label(report.video)}: {report.frame_count} frames, {report.width}x{report.height}"]
    rows = [("output change", "flicker", "")]
    if report.against is not None:
        rows += [
            ("input change", "input_change", f"  ({_label(report.against)})"),
            ("excess flicker", "excess", "  (output change - input change)"),
        ]
    for label, key, note in rows:
        lines.append(f"  {label:<15} mean {numbers[f'mean_{key}']:7.3f}   p95 {numbers[f'p95_{key}']:7.3f}{note}")
    lines.append("  (mean absolute change between consecutive frames, 0-255 scale)")
    if report.cuts:
        lines.append(f"  scene cuts at frames {', '.join(map(str, report.cuts))}: their changes are left out")
    return "\n".join(lines)


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: a crash never leaves half a file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(report: Report, path: Path) -> None:
    """The report's summary and per-frame numbers as JSON."""
    _replace_atomically(Path(path), (json.dumps(report.to_dict(), indent=2) + "\n").encode())


# The plot: a line chart drawn with Pillow, so vlrt needs no plotting library.
PLOT_SIZE = (960, 400)
MARGIN = (72, 56, 24, 52)  # left, top, right, bottom
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
CUT_COLOUR = (120, 120, 120)
OUTPUT_COLOUR, INPUT_COLOUR = (215, 50, 40), (40, 100, 210)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow before 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _nice_step(span: float, ticks: int) -> float:
    """A 1, 2 or 5 times a power of ten that cuts `span` into about `ticks` parts."""
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if raw <= m * power)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def write_plot(report: Report, path: Path) -> None:
    """A PNG line chart of the video's per-frame change, with the input's change when measured."""
    series = [("output change (flicker)", report.flicker, OUTPUT_COLOUR)]
    if report.input_change is not None:
        series.append(("input change", report.input_change, INPUT_COLOUR))
    image = Image.new("RGB", PLOT_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(12)
    left, top, right, bottom = MARGIN[0], MARGIN[1], PLOT_SIZE[0] - MARGIN[2], PLOT_SIZE[1] - MARGIN[3]

    peak = max(max(values) for _, values, _ in series)
    y_step = _nice_step(peak if peak > 0 else 1.0, 5)
    y_top = y_step * max(1, math.ceil(peak / y_step))
    x_first, x_last = 1, max(report.frame_count - 1, 2)
    x_step = max(1, int(_nice_step(x_last - x_first, 8)))

    def to_xy(frame: float, value: float) -> tuple[float, float]:
        return (
            left + (frame - x_first) / (x_last - x_first) * (right - left),
            bottom - value / y_top * (bottom - top),
        )

    for tick in np.arange(0.0, y_top + y_step / 2, y_step):
        _, y = to_xy(x_first, tick)
        draw.line([(left, y), (right, y)], fill=GRID)
        label = f"{tick:g}"
        w, h = _text_size(draw, label, small)
        draw.text((left - 6 - w, y - h / 2 - 2), label, fill=INK, font=small)
    for tick in range(math.ceil(x_first / x_step) * x_step, x_last + 1, x_step):
        x, _ = to_xy(tick, 0)
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        w, _ = _text_size(draw, str(tick), small)
        draw.text((x - w / 2, bottom + 7), str(tick), fill=INK, font=small)
    draw.rectangle([left, top, right, bottom], outline=INK)
    for cut in report.cuts:  # a dashed vertical line where each new shot starts
        x, _ = to_xy(cut, 0)
        for y in range(top + 2, bottom, 8):
            draw.line([(x, y), (x, min(y + 4, bottom))], fill=CUT_COLOUR, width=1)
        draw.text((x + 3, top + 3), "cut", fill=CUT_COLOUR, font=small)

    for _, values, colour in series:
        points = [to_xy(i + 1, v) for i, v in enumerate(values)]
        if len(points) == 1:
            (x, y), = points
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        else:
            draw.line(points, fill=colour, width=2, joint="curve")

    numbers = report.summary()
    name = _label(Path(report.video).name or report.video)
    title = f"{name}: mean flicker {numbers['mean_flicker']:.2f}, p95 {numbers['p95_flicker']:.2f}"
    if report.input_change is not None:
        title += f"; excess mean {numbers['mean_excess']:.2f}, p95 {numbers['p95_excess']:.2f}"
    draw.text((left, 8), title, fill=INK, font=font)
    x_label = "frame"
    w, _ = _text_size(draw, x_label, font)
    draw.text(((left + right - w) / 2, PLOT_SIZE[1] - 24), x_label, fill=INK, font=font)
    _draw_y_label(image, "mean |change| vs previous frame (0-255)", font, (top + bottom) // 2)
    _draw_legend(draw, series, small, right)

    buffer = BytesIO()
    image.save(buffer, format="PNG")
    _replace_atomically(Path(path), buffer.getvalue())


def _draw_y_label(image: Image.Image, text: str, font: ImageFont.ImageFont, centre_y: int) -> None:
    """Text turned 90° along the left edge."""
    draw = ImageDraw.Draw(image)
    w, h = _text_size(draw, text, font)
    strip = Image.new("RGB", (w + 4, h + 6), BACKGROUND)
    ImageDraw.Draw(strip).text((2, 0), text, fill=INK, font=font)
    turned = strip.rotate(90, expand=True)
    image.paste(turned, (6, max(0, centre_y - turned.height // 2)))


def _draw_legend(draw: ImageDraw.ImageDraw, series: list, font: ImageFont.ImageFont, right: int) -> None:
    """Swatches and names in one row under the title, right-aligned, clear of the data."""
    x = right
    for name, _, colour in reversed(series):
        x -= _text_size(draw, name, font)[0]
        draw.text((x, 30), name, fill=INK, font=font)
        draw.line([(x - 28, 38), (x - 6, 38)], fill=colour, width=3)
        x -= 44


def beside(spec: str, suffix: str) -> Path:
    """`out.mp4` → `out.mp4<suffix>`; a folder `out/` → `out<suffix>` next to it."""
    path = Path(spec)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    return path.with_name(path.name + suffix)


def report_beside_output(
    output: str, input: str, *, extract_nth_frame: int = 1, max_frames: int | None = None
) -> Report:
    """After a render: measure OUTPUT against INPUT and write `<output>.flicker.png` and `.flicker.json`.

    Pass the render's `extract_nth_frame` and `max_frames` so the input lines up with the
    output. Standard input was consumed by the render, so with INPUT '-' only the output's own
    flicker is measured; an output of '-' cannot be read back and is a VlrtError.
    """
    if output == "-":
        raise VlrtError("--report needs an OUTPUT it can read back (a file or a folder), not '-': "
                        "save the output and run 'vlrt report' on it")
    against = None if input == "-" else input
    report = flicker_report(
        output, against, extract_nth_frame=extract_nth_frame, max_frames=max_frames, cuts=recorded_cuts(output)
    )
    write_plot(report, beside(output, PLOT_SUFFIX))
    write_json(report, beside(output, JSON_SUFFIX))
    return report


def run_report(args: argparse.Namespace) -> int:
    """`vlrt report`: summary on standard output, plot (and JSON) written beside the video."""
    report = flicker_report(
        args.video, args.against, extract_nth_frame=args.extract_nth_frame, max_frames=args.max_frames,
        show_progress=not args.quiet, cuts=_cuts_for(args),
    )
    print(format_summary(report))
    plot = Path(args.plot) if args.plot else (None if args.video == "-" else beside(args.video, PLOT_SUFFIX))
    if plot is not None:
        write_plot(report, plot)
        print(f"plot: {plot}")
    if args.json:
        write_json(report, Path(args.json))
        print(f"json: {args.json}")
    return 0


def _cuts_for(args: argparse.Namespace) -> tuple[int, ...]:
    """`--scene-cuts` as given, else the cuts VIDEO's render recorded."""
    if args.scene_cuts is None:
        return () if args.video == "-" else recorded_cuts(args.video)
    given = parse_cut_list(args.scene_cuts)
    if given is None:
        raise VlrtError("vlrt report --scene-cuts takes a list of frames or 'none' (it does not detect cuts): "
                        "leave it out to use the cuts the render recorded")
    return given


def add_report_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `vlrt report` to the command line's subcommands."""
    parser = commands.add_parser(
        "report",
        help="temporal-stability report: per-frame flicker of a video, optionally net of its input's motion",
        description=(
            "Measures the mean absolute change between consecutive frames (0-255). With --against, the "
            "input's own change is subtracted frame by frame, so motion in the source is not counted as flicker."
        ),
    )
    parser.add_argument("video", help="video file, image folder, or '-' for standard input")
    parser.add_argument("--against", metavar="INPUT", help="the input VIDEO was rendered from (any input vlrt reads)")
    parser.add_argument("--extract-nth-frame", type=int, default=1, metavar="N",
                        help="read INPUT keeping every Nth frame, as the render did (default 1)")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N",
                        help="read at most N frames of INPUT, as the render did")
    parser.add_argument("--plot", metavar="PATH",
                        help=f"PNG plot (default: VIDEO{PLOT_SUFFIX} beside the video or folder; none for '-')")
    parser.add_argument("--json", metavar="PATH", help="also write the summary and per-frame numbers as JSON")
    parser.add_argument("--scene-cuts", metavar="LIST",
                        help="first frames of new shots, marked and left out of the figures, or 'none' "
                             "(default: the cuts recorded in VIDEO's settings file)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar on standard error")
    parser.set_defaults(run=run_report)
    return parser
