"""The page: the extension's panel, a preview sweep and a render, each run as a `vlrt` child process.

The page reads and writes only the paths typed into it or uploaded to it. Pictures go to the page
as pixels; the output video and the flicker plot are copied into the app's own temporary folder
before Gradio serves them, so no other file of the machine is ever reachable through it.
"""

from __future__ import annotations

import itertools
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import av
import gradio as gr
import numpy as np
from PIL import Image

from vlrt.errors import VlrtError
from vlrt.image.contact_sheet import LABEL_HEIGHT
from vlrt.io.images import list_images, read_image
from vlrt.io.parts import parts_folder
from vlrt.io.seek import count_video_frames
from vlrt.io.sources import open_source
from vlrt.render.preview import parse_sweep
from vlrt.settings.config import build_settings
from vlrt.tools.report import PLOT_SUFFIX, beside
from vlrt.ui.panel import (
    BY_NAME,
    FIELDS,
    GROUPS,
    Field,
    check,
    load_values,
    presets,
    presets_folder,
    save_values,
    settings_arguments,
    to_widget,
)
from vlrt.ui.runner import Child

LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN_GROUPS = GROUPS[:3]  # the extension's panel and its advanced accordion are open, as in the WebUI
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm")
TICK_S = 0.5  # how often the page asks how a render is going


def _error(exc: VlrtError) -> str:
    return f"vlrt: error: {exc}"


def _widget(field: Field) -> gr.components.Component:
    common = {"label": field.name, "info": field.help, "elem_id": f"setting-{field.name}"}
    value = to_widget(field, field.default)
    if field.kind == "checkbox":
        return gr.Checkbox(value=value, **common)
    if field.kind == "dropdown":
        return gr.Dropdown(choices=list(field.choices), value=value, **common)
    if field.kind in ("integer", "number"):
        return gr.Number(value=value, precision=0 if field.kind == "integer" else None, **common)
    if field.kind == "lines":
        return gr.Textbox(value=value, lines=2, **{**common, "info": field.help + " (one a line)"})
    return gr.Textbox(value=value, **common)


class Session:
    """The state behind the page: one render or preview at a time, and the app's scratch folder."""

    def __init__(self) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="vlrt-ui-"))
        self.job: Child | None = None
        self.watch: RenderWatch | None = None
        self.sweeps: list[tuple[str, list[object]]] = []
        self._starting = threading.Lock()

    def start(self, argv: list[str]) -> Child:
        """Run `vlrt ARGV`, unless a render or preview is still running (two clicks never start two)."""
        with self._starting:
            if self.job is not None and self.job.running:
                raise VlrtError("a render or preview is running: stop it or wait for it to finish")
            self.job = Child(argv)
            return self.job

    def served(self, path: Path) -> str:
        """A copy of `path` in the app's own folder, the only kind of file the page is given."""
        target = self.scratch / f"{time.monotonic_ns()}-{path.name}"
        shutil.copyfile(path, target)
        return str(target)


class RenderWatch:
    """What the page shows of the render it started. A timer asks for it every `TICK_S` (no request
    stays open for the whole render: a dropped update is made good by the next), and it reports the
    end exactly once."""

    def __init__(self, job: Child, input_spec: str, output: str, subsampling: dict[str, Any]) -> None:
        self.job, self.input_spec, self.output, self.subsampling = job, input_spec, output, subsampling
        self.seen_done: int | None = None
        self.seen_index: int | None = None
        self.reported = False

    def update(self, session: Session) -> list[Any]:
        """The render outputs' new values (message, progress, input and output frame, video, plot, log)."""
        job = self.job
        if self.reported:
            return [gr.update()] * 7
        if job.running:
            progress = job.progress.describe() if job.progress else "starting"
            return [gr.update(), progress, *self._pictures(False), gr.update(), gr.update(), "\n".join(job.messages)]
        self.reported = True
        done = job.wait() == 0
        plot_path = beside(self.output, PLOT_SUFFIX)
        finished = done and Path(self.output).is_file() and self.output.lower().endswith(VIDEO_SUFFIXES)
        return [
            job.error() or ("finished" if done else "stopped: finished frames are kept; Resume continues"),
            (job.progress.describe() if job.progress else "") + (" · done" if done else ""),
            *self._pictures(True),
            session.served(Path(self.output)) if finished else gr.update(),
            np.asarray(Image.open(plot_path).convert("RGB")) if done and plot_path.is_file() else gr.update(),
            "\n".join(job.messages),
        ]

    def _pictures(self, final: bool) -> list[Any]:
        """The latest finished frame beside its input, read only when the count moved."""
        done = self.job.progress.done if self.job.progress else None
        if not final and done == self.seen_done:
            return [gr.update(), gr.update()]
        self.seen_done = done
        latest = _latest_output(self.output)
        if latest is None or latest[0] == self.seen_index:
            return [gr.update(), gr.update()]
        self.seen_index = latest[0]
        return [_frame(self.input_spec, latest[0], **self.subsampling), latest[1]]


def _values(names: list[str], raw: tuple) -> dict[str, Any]:
    return dict(zip(names, raw))


def _frame(spec: str, index: int, **subsampling: Any) -> np.ndarray | None:
    """Frame `index` of an input or output (None when it cannot be read yet)."""
    try:
        with open_source(spec, start=index, **subsampling) as source:
            frame = next(iter(source), None)
    except VlrtError:
        return None
    return None if frame is None else frame.image


def _latest_output(output: str) -> tuple[int, np.ndarray] | None:
    """The last finished frame of a render: a folder's last PNG; a video's last closed part while it
    runs, its last frame once it is joined."""
    path = Path(output)
    if output.endswith("/") or path.is_dir():
        images = list_images(path) if path.is_dir() else []
        return (len(images) - 1, read_image(images[-1])[0]) if images else None
    parts = sorted(parts_folder(path).glob("*.mkv")) if parts_folder(path).is_dir() else []
    if parts:
        with av.open(str(parts[-1])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return (int(parts[-1].stem) + len(frames) - 1, frames[-1]) if frames else None
    if path.is_file():
        last = count_video_frames(output, path.name) - 1
        picture = _frame(output, last)
        return None if picture is None else (last, picture)
    return None


def build(session: Session | None = None) -> gr.Blocks:
    """The page, with every setting of `vlrt render` generated from the settings' definitions."""
    session = session or Session()
    with gr.Blocks(title="vlrt — video loopback", analytics_enabled=False) as page:
        gr.Markdown("## vlrt — Video Loopback\nSD img2img loopback-superimpose over a video. "
                    "Every setting is `vlrt render`'s; renders and previews run as `vlrt` commands.")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    input_path = gr.Textbox(label="input", elem_id="input",
                                            info="a video file or a folder of images on this machine, or upload one")
                    upload = gr.File(label="upload an input", elem_id="upload", height=110)
                    output_path = gr.Textbox(label="output", elem_id="output",
                                             info="a video file (.mp4, .mkv, .mov, .webm) or a folder ending in /")
                widgets: dict[str, gr.components.Component] = {}
                top = [f for f in FIELDS if f.group == "top"]
                with gr.Row():
                    for field in top:
                        widgets[field.name] = _widget(field)
                with gr.Row():
                    config_path = gr.Textbox(label="config", elem_id="config", info="a TOML config to load or save")
                    load_button = gr.Button("Load config", elem_id="load-config")
                    save_button = gr.Button("Save config", elem_id="save-config")
                    preset = gr.Dropdown(choices=presets(), value=None, label="preset", elem_id="preset",
                                         info="the example configs in presets/")
                for group in GROUPS:
                    with gr.Accordion(group, open=group in OPEN_GROUPS, elem_id=f"group-{GROUPS.index(group)}"):
                        for field in FIELDS:
                            if field.group == group:
                                widgets[field.name] = _widget(field)
            with gr.Column(scale=2):
                message = gr.Textbox(label="message", elem_id="message", interactive=False)
                with gr.Tab("Render"):
                    with gr.Row():
                        render_button = gr.Button("Render", variant="primary", elem_id="render")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                        resume_button = gr.Button("Resume", elem_id="resume")
                    status = gr.Textbox(label="progress", elem_id="progress", interactive=False)
                    with gr.Row():
                        input_frame = gr.Image(label="input frame", elem_id="input-frame", interactive=False)
                        output_frame = gr.Image(label="latest finished frame", elem_id="output-frame", interactive=False)
                    video = gr.Video(label="output video", elem_id="video", interactive=False)
                    plot = gr.Image(label="flicker report", elem_id="plot", interactive=False)
                    log = gr.Textbox(label="log", elem_id="log", lines=6, interactive=False)
                with gr.Tab("Preview"):
                    frames = gr.Textbox(value="0", label="frames", elem_id="preview-frames",
                                        info="comma-separated frame numbers (0-based), as vlrt preview --frames")
                    sweeps = gr.Textbox(label="sweeps", elem_id="preview-sweeps", lines=2,
                                        info="NAME=V1,V2 a line (use | between values that hold commas); click a cell "
                                             "of the grid to copy its values into the panel")
                    preview_button = gr.Button("Preview", variant="primary", elem_id="preview")
                    grid = gr.Image(label="grid", elem_id="grid", interactive=False, type="pil")

        names = list(widgets)
        components = [widgets[n] for n in names]

        def apply(values: dict[str, Any]) -> list[Any]:
            return [gr.update(value=values[n]) if n in values else gr.update() for n in names]

        def on_upload(file: str | None) -> Any:
            return gr.update(value=file) if file else gr.update()

        def on_load(path: str) -> list[Any]:
            try:
                return [f"loaded {path}", *apply(load_values(Path(path)))]
            except VlrtError as exc:
                return [_error(exc), *apply({})]

        def on_preset(name: str | None) -> list[Any]:
            if not name:
                return [gr.update(), *apply({})]
            return on_load(str(presets_folder() / name))

        def on_save(path: str, *raw: Any) -> str:
            try:
                save_values(_values(names, raw), Path(path))
            except VlrtError as exc:
                return _error(exc)
            return f"saved {path}"

        def render(input_spec: str, output: str, resume: bool, raw: tuple) -> list[Any]:
            try:
                settings = check(_values(names, raw))
                if not input_spec.strip() or not output.strip():
                    raise VlrtError("type an input path (or upload one) and an output path first")
                argv = ["render", input_spec, "-o", output, *settings_arguments(_values(names, raw)), "--report"]
                job = session.start([*argv, "--resume"] if resume else argv)
            except VlrtError as exc:
                return [_error(exc), *[gr.update()] * 6]
            subsampling = {"extract_nth_frame": settings.extract_nth_frame, "max_frames": settings.max_frames,
                           "is_continue": settings.is_continue}
            session.watch = RenderWatch(job, input_spec, output, subsampling)
            return [shlex.join(["vlrt", *job.argv]), "starting", None, None, None, None, ""]

        def on_tick() -> list[Any]:
            watch = session.watch
            return [gr.update()] * 7 if watch is None else watch.update(session)

        def on_render(input_spec: str, output: str, *raw: Any) -> list[Any]:
            return render(input_spec, output, False, raw)

        def on_resume(input_spec: str, output: str, *raw: Any) -> list[Any]:
            return render(input_spec, output, True, raw)

        def on_stop() -> str:
            if session.job is None or not session.job.running:
                return "nothing is running"
            session.job.interrupt()
            return "stopping: the finished frames are kept"

        def on_preview(input_spec: str, frame_text: str, sweep_text: str, *raw: Any) -> list[Any]:
            try:
                check(_values(names, raw))
                sweep_list = [parse_sweep(line) for line in sweep_text.splitlines() if line.strip()]
                for name, values in sweep_list:
                    for value in values:
                        build_settings(overrides={name: value})  # as vlrt preview checks a sweep before any work
                if not input_spec.strip():
                    raise VlrtError("type an input path (or upload one) first")
                grid_path = session.scratch / f"grid-{time.monotonic_ns()}.png"
                argv = ["preview", input_spec, "-o", str(grid_path), "--frames", frame_text or "0",
                        *[a for line in sweep_text.splitlines() if line.strip() for a in ("--sweep", line.strip())],
                        *settings_arguments(_values(names, raw))]
                job = session.start(argv)
            except VlrtError as exc:
                return [_error(exc), gr.update()]
            job.wait()
            if not grid_path.is_file():
                return [job.error() or "vlrt preview wrote no grid", gr.update()]
            session.sweeps = sweep_list
            return [shlex.join(["vlrt", *argv]), Image.open(grid_path).convert("RGB")]

        def on_cell(picture: Image.Image | None, event: gr.SelectData) -> list[Any]:
            combos = list(itertools.product(*[v for _, v in session.sweeps]))
            if picture is None or not session.sweeps:
                return [gr.update(), *apply({})]
            row = int((event.index[1] - LABEL_HEIGHT) * len(combos) / (picture.height - LABEL_HEIGHT))
            if not 0 <= row < len(combos):
                return [gr.update(), *apply({})]
            chosen = dict(zip([n for n, _ in session.sweeps], combos[row]))
            values = {n: to_widget(BY_NAME[n], v) for n, v in chosen.items() if n in BY_NAME}
            return [" ".join(f"{k}={v}" for k, v in chosen.items()) + " copied into the panel", *apply(values)]

        upload.upload(on_upload, upload, input_path)
        load_button.click(on_load, config_path, [message, *components])
        preset.change(on_preset, preset, [message, *components])
        save_button.click(on_save, [config_path, *components], message)
        render_outputs = [message, status, input_frame, output_frame, video, plot, log]
        render_button.click(on_render, [input_path, output_path, *components], render_outputs)
        resume_button.click(on_resume, [input_path, output_path, *components], render_outputs)
        gr.Timer(TICK_S).tick(on_tick, None, render_outputs, show_progress="hidden", concurrency_limit=1)
        stop_button.click(on_stop, None, message)
        preview_button.click(on_preview, [input_path, frames, sweeps, *components], [message, grid])
        grid.select(on_cell, grid, [message, *components])
    return page


def serve(host: str = "127.0.0.1", port: int = 7860) -> None:
    """Start the page and block; beyond the loopback address, warn who can reach it."""
    if host not in LOOPBACK:
        print(f"vlrt: warning: listening on {host}: anyone who can reach this address can render and read "
              "any file this process can read", file=sys.stderr)
    # System fonts: the default theme's web fonts would be fetched from the network.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    build().queue(default_concurrency_limit=None).launch(server_name=host, server_port=port, show_error=False, share=False,
                                                         inbrowser=False, quiet=True, theme=theme, footer_links=[])
