"""Wires one render: source → resize → loop passes → sink, driven frame by frame.

The driver feeds frames from the source while the pipeline holds fewer than its capacity,
moves finished frames from each stage to the next (and to the per-pass videos), and, when no
stage can move, lets the executor run one batched round of engine work. Memory therefore depends
on the stages' capacities, never on the length of the video, and the first output frame leaves
after about loop_n·(h+in_flight) input frames. Since each stage's capacity covers what it must
hold before it can emit, the driver can always make progress.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from itertools import chain, takewhile
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from vlrt.engines.base import EngineSet
from vlrt.errors import VlrtError
from vlrt.executor.control import ControlRunner
from vlrt.executor.executor import Executor
from vlrt.frames import Frame
from vlrt.image.color import FIRST
from vlrt.image.resize import resize_frame
from vlrt.image.scene_cuts import parse_cut_list, shot_start, span_reads
from vlrt.io.sinks import Sink, open_sink
from vlrt.io.sources import Source, SourceInfo, open_source
from vlrt.model.controlnet import ControlNet, load_controlnets, residual_shapes
from vlrt.model.loading import Model, ModelOptions, load_model
from vlrt.model.prompt_syntax import split_lora_tags
from vlrt.model.samplers import check_sampler, prompt_steps
from vlrt.model.textual_inversion import embedding_records
from vlrt.render.engine_picker import default_engines_dir, open_engines, precision_for, resolve_backend
from vlrt.render.memory import fit_render_size
from vlrt.render.prepare import Preparer
from vlrt.render.preview import PreviewCollector
from vlrt.render.progress import Progress
from vlrt.render.run_state import (
    check_same_controlnets,
    check_same_embeddings,
    check_same_loras,
    finished_folder_frames,
    finished_video_frames,
    is_folder_output,
    loop_output,
    resume_settings,
    write_settings,
)
from vlrt.settings.config import Settings
from vlrt.settings.draft import describe, draft_size, model_vae
from vlrt.settings.params import ParamResolver
from vlrt.stages.base import Stage
from vlrt.stages.denoise import Denoise
from vlrt.stages.loop_pass import LoopPass


@dataclass
class RenderResult:
    frames: int
    output: str
    settings: Settings
    engine_calls: dict[str, int]
    seconds: float


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VlrtError("device cuda was asked for but torch sees no CUDA GPU: use --device cpu or install a CUDA build of torch")
    return torch.device(name)


def open_model(settings: Settings, device: torch.device) -> Model:
    """The run's model with its settings' VAE (a draft's own), LoRAs (`--lora` and the prompt's tags), CLIP skip,
    embeddings and single-file options."""
    options = ModelOptions(
        vae=model_vae(settings), loras=tuple(settings.lora), lora_tags=split_lora_tags(settings.prompt)[1],
        lora_dir=settings.lora_dir, clip_skip=settings.clip_skip, embeddings_dir=settings.embeddings_dir,
        model_config=settings.model_config, prediction_type=settings.prediction_type,
    )
    return load_model(settings.model, device, options=options)


def frame_size(settings: Settings, source_w: int, source_h: int, multiple: int) -> tuple[int, int]:
    """The render size: given, or the source's rounded down to a multiple of the VAE scale factor."""
    sizes = []
    for name, given, source in (("width", settings.width, source_w), ("height", settings.height, source_h)):
        if given is None:
            given = source // multiple * multiple
            if given < multiple:
                raise VlrtError(f"the input is {source} pixels in {name}, smaller than the model's minimum {multiple}: pass --{name}")
        elif given < multiple or given % multiple:
            lower = max(multiple, given // multiple * multiple)
            raise VlrtError(
                f"{name} {given} is not a multiple of {multiple} (the model's VAE scale factor): use {lower} or {lower + multiple}"
            )
        sizes.append(given)
    return sizes[0], sizes[1]


SDXL_AREA = 1024 * 1024  # the area SDXL models are trained at (at several aspect ratios)


def sdxl_size_warning(model: Model, width: int, height: int) -> str | None:
    """One line when an SDXL render is far below SDXL's area (under half of 1024²), where its pictures fall
    apart; the render size keeps the source size rule all the same."""
    if not model.is_sdxl or width * height >= SDXL_AREA // 2:
        return None
    return (
        f"vlrt: warning: {width}×{height} is {width * height / SDXL_AREA:.0%} of the 1024×1024 area SDXL models are "
        "trained at: expect broken pictures, or pass --width/--height nearer it (e.g. 1024×576 for 16:9, 896×1152 for 3:4)"
    )


def fastdvdnet_network(weights: str, allow_random: bool, log: Callable[[str], None]) -> nn.Module:
    """FastDVDnet from the user's weights; random weights only for the demo, and said so."""
    from vlrt.fastdvdnet.checkpoint import load_fastdvdnet
    from vlrt.fastdvdnet.network import FastDVDnet

    if weights:
        return load_fastdvdnet(Path(weights))
    if not allow_random:
        raise VlrtError(
            "FastDVDNet needs its weights: download model.pth from github.com/m-tassano/fastdvdnet (MIT licence) "
            "and pass --fastdvdnet-weights PATH"
        )
    log("vlrt: FastDVDNet with RANDOM weights (demo only): pass --fastdvdnet-weights for the real network")
    torch.manual_seed(0)
    return FastDVDnet().eval()


def _denoiser_with_notes(settings: Settings, model: Model, log: Callable[[str], None]) -> nn.Module | None:
    """FastDVDnet when the settings ask for it; says when the model is the demo or sigma is out of range."""
    if model.is_demo:
        log("vlrt: using the built-in DEMO model (tiny, trained for a few minutes): not a real Stable Diffusion model")
    if settings.video_post_process_method != "fastdvdnet":
        return None
    if not 5 <= settings.fastdvdnet_noise_sigma <= 55:
        log(f"vlrt: warning: fastdvdnet_noise_sigma {settings.fastdvdnet_noise_sigma:g} is outside FastDVDnet's trained 5–55")
    return fastdvdnet_network(settings.fastdvdnet_weights, model.is_demo, log)


def concrete_seeds(settings: Settings) -> Settings:
    """Seeds of −1 replaced by random ones, once per run, so the settings file repeats the run."""
    seed = settings.seed if settings.seed != -1 else secrets.randbelow(2**32)
    subseed = settings.subseed if settings.subseed != -1 else secrets.randbelow(2**32)
    return replace(settings, seed=seed, subseed=subseed)


class Pipeline:
    """A chain of stages between a source and a sink, with bounded occupancy."""

    def __init__(self, stages: list[Stage], executor: Executor, capacity: int, taps: dict[int, Sink]) -> None:
        self.stages = stages
        self.executor = executor
        self.capacity = capacity
        self.taps = taps

    def run(
        self,
        frames: Iterator[Frame],
        sink: Sink,
        progress: Progress,
        on_output: Callable[[Frame], None],
        start: int = 0,
        stop: int | None = None,
    ) -> int:
        """Push every frame through; write those in [start, stop); return how many were written."""
        stages, written, source_done = self.stages, 0, False

        def wanted(frame: Frame) -> bool:
            return frame.index >= start and (stop is None or frame.index < stop)

        if not stages:
            for frame in frames:
                if wanted(frame):
                    frame = frame.on_host()
                    on_output(frame)
                    sink.write(frame)
                    written += 1
            return written
        while not stages[-1].finished:
            moved = False
            if not source_done and sum(s.held for s in stages) < self.capacity:  # a frame at a time, so
                frame = next(frames, None)  # that work starts while the stages fill
                if frame is None:
                    stages[0].close()
                    source_done = True
                else:
                    stages[0].push(frame)
                moved = True
            for i, stage in enumerate(stages):
                for frame in stage.pop():
                    moved = True
                    if i in self.taps and wanted(frame):
                        self.taps[i].write(frame.on_host())
                    if i + 1 < len(stages):
                        stages[i + 1].push(frame)
                    elif wanted(frame):
                        frame = frame.on_host()
                        on_output(frame)
                        sink.write(frame)
                        written += 1
                if stage.finished and i + 1 < len(stages) and not stages[i + 1].closed:
                    stages[i + 1].close()
                    moved = True
            if moved:
                progress.update(written, [s.emitted for s in stages])
                if self.executor.jobs:  # new jobs: queue their round now, while the stages go on filling
                    self._run_round(stages)
            elif self.executor.pending:
                self._run_round(stages)
            elif not stages[-1].finished:
                raise RuntimeError("pipeline stalled with no pending work (a bug in a stage)")
        return written

    def _run_round(self, stages: list[Stage]) -> None:
        """`Executor.run_once`, an engine's failure made one line naming the frame at work."""
        try:
            self.executor.run_once()
        except (RuntimeError, OSError, ValueError) as exc:
            frames_in_work = sorted({s.emitted for s in stages if not s.finished})
            raise VlrtError(
                f"the engines failed while rendering frame {frames_in_work[0] if frames_in_work else '?'}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}; finished frames "
                "are kept: fix the cause and run the same command with --resume"
            ) from exc


def render(
    settings: Settings,
    input_spec: str,
    output_spec: str,
    *,
    quiet: bool = False,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    model: Model | None = None,
    preview: Path | None = None,
    resume: bool = False,
    engines: EngineSet | None = None,
) -> RenderResult:
    """Render INPUT to OUTPUT with these settings; nothing that looks finished is left on failure.

    With `resume`, an interrupted render of the same output with the same settings is continued:
    frames already finished are kept and the rest are rendered exactly as an uninterrupted run would.
    `model` and `engines` are given when the caller has them already (previews, benchmarks).
    """
    check_sampler(settings.sampler_name)
    start = 0
    if resume:
        if settings.save_every_loop and not is_folder_output(output_spec):
            raise VlrtError("--resume cannot continue the per-pass videos of --save-every-loop: resume without it")
        settings, start = _resume_point(settings, output_spec)
    settings = concrete_seeds(settings)
    resolver = ParamResolver(settings, settings.seed, settings.subseed)
    progress = Progress(None, settings.loop_n, quiet)
    device = pick_device(settings.device)
    if model is None:
        model = open_model(settings, device)
    controlnets = load_controlnets(settings.controlnet, model)
    records = controlnet_records(controlnets)
    embeddings = embedding_records(model.embeddings)
    if resume:
        check_same_loras(output_spec, model.loras)
        check_same_controlnets(output_spec, records)
        check_same_embeddings(output_spec, embeddings)
    denoiser = _denoiser_with_notes(settings, model, progress.log)
    with _open_source(settings, input_spec, stdin) as source:
        given = settings
        settings, prepare = _settle(settings, source.info, model, resolver, progress.log)
        executor = _executor(settings, model, denoiser, device, progress.log, controlnets, engines)
        stages, tap_after = _render_stages(settings, model, resolver, executor, max(0, start - pipeline_reach(settings)))
        taps = {}
        if settings.save_every_loop and output_spec == "-":
            progress.log("vlrt: save_every_loop ignored: the output is a pipe")
        elif settings.save_every_loop:
            taps = {stage: loop_output(output_spec, loop + 1) for loop, stage in enumerate(tap_after[:-1])}
        # A draft records the size as given: read back, the draft rules halve it again (vlrt.settings.draft).
        recorded = replace(settings, width=given.width, height=given.height) if settings.draft else settings
        draft = describe(settings, (settings.width, settings.height)) if settings.draft else None
        write_settings(recorded, input_spec, output_spec, None, model.loras, controlnets=records, embeddings=embeddings,
                       draft=draft)
        with executor:
            written = _stream(source, settings, stages, executor, output_spec, taps, progress, stdout, preview, prepare, start)
    write_settings(recorded, input_spec, output_spec, written, model.loras, controlnets=records, cuts=prepare.shots.cuts,
                   embeddings=embeddings, draft=draft)
    progress.log(f"vlrt: wrote {written} frames to {output_spec} in {progress.elapsed:.1f} s")
    return RenderResult(written, output_spec, settings, executor.engines.calls, progress.elapsed)


def denoise(
    settings: Settings,
    input_spec: str,
    output_spec: str,
    *,
    quiet: bool = False,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
) -> RenderResult:
    """FastDVDNet alone over a video: it denoises what it is given (no synthetic noise)."""
    progress = Progress(None, 1, quiet)
    device = pick_device(settings.device)
    network = fastdvdnet_network(settings.fastdvdnet_weights, False, progress.log)
    with _open_source(settings, input_spec, stdin) as source:
        settings = replace(settings, width=source.info.width, height=source.info.height)
        executor = Executor(_engines(settings, None, network, device, progress.log))
        stage = Denoise(
            executor,
            sigma=settings.fastdvdnet_noise_sigma,
            alpha=settings.video_post_process_alpha,
            rounding=settings.blend_rounding,
            max_batch=settings.max_batch,
        )
        with executor:
            written = _stream(source, settings, [stage], executor, output_spec, {}, progress, stdout, None, None)
    progress.log(f"vlrt: wrote {written} frames to {output_spec} in {progress.elapsed:.1f} s")
    return RenderResult(written, output_spec, settings, executor.engines.calls, progress.elapsed)


def _stream(
    source: Source,
    settings: Settings,
    stages: list[Stage],
    executor: Executor,
    output_spec: str,
    taps: dict[int, str],
    progress: Progress,
    stdout: BinaryIO | None,
    preview: Path | None,
    prepare: Preparer | None,
    start: int = 0,
) -> int:
    """Run the frames of `source` (prepared by `prepare`) through `stages` into the output (and the per-pass taps).

    Output frames before `start` are dropped (they exist already); the stages start at their
    `first` frame, `reach` frames earlier, so the kept frames are exact."""
    fps = settings.output_fps(source.info.fps)
    audio = audio_for(settings, source.info)
    times = frame_times_for(settings, source.info)
    progress.set_total(source.info.frame_count)
    sinks: list[Sink] = []
    try:
        sink = _open_sink(settings, output_spec, fps, audio, stdout, resume_at=start, times=times)
        sinks.append(sink)
        tap_sinks = {stage: _open_sink(settings, spec, fps, audio, None, times=times) for stage, spec in taps.items()}
        sinks.extend(tap_sinks.values())
        capacity = sum(s.capacity for s in stages) if stages else 1
        pipeline = Pipeline(stages, executor, capacity, tap_sinks)
        collector = PreviewCollector(source.info.frame_count)
        first = stages[0].first if stages else start
        if prepare is None:
            device = pick_device(settings.device)
            frames = (f.on_device(device) for f in source if f.index >= first)
        else:
            frames = prepare.frames(iter(source), first)
        written = pipeline.run(collector.watch_inputs(frames), sink, progress, collector.see_output, start)
        if written == 0 and start == 0:
            raise VlrtError("the input produced no frames: check it is a video or an image folder with frames")
        for s in sinks:
            s.close()
        if preview is not None:
            collector.save(preview)
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    finally:
        progress.close()
    return written


def preview_from_output(settings: Settings, input_spec: str, output_spec: str, preview: Path) -> None:
    """The --preview sheet of a finished render, read back from its input and output: a segmented
    render's frames pass through no one process. Inputs are resized as the render resized them."""
    with open_source(output_spec) as output:
        collector = PreviewCollector(output.info.frame_count)
        for frame in takewhile(lambda f: f.index <= collector.indices[-1], output):
            collector.see_output(frame)
    shown = collector.outputs
    with _open_source(settings, input_spec, None) as source:
        for frame in source:
            if frame.index in shown:
                height, width = shown[frame.index].shape[:2]
                collector.inputs[frame.index] = resize_frame(frame, width, height, settings.resize_mode).image
            if len(collector.inputs) == len(shown):
                break
    collector.save(preview)


def audio_for(settings: Settings, info: SourceInfo) -> Path | None:
    """The file whose sound a video output carries: the input's, unless frames were skipped."""
    subsampled = settings.extract_nth_frame != 1 and not settings.is_continue
    return info.path if info.has_audio and not subsampled else None


def frame_times_for(settings: Settings, info: SourceInfo) -> list[Fraction] | None:
    """The source's frame times a video output keeps (a variable rate), unless --output-frame-rate asks for a constant one."""
    return info.frame_times if settings.output_frame_rate is None else None


def controlnet_records(controlnets: list[ControlNet]) -> list[dict[str, str]]:
    """What the settings file records of each unit's ControlNet (and --resume checks)."""
    return [{"model": c.unit.model, "sha256": c.sha256} for c in controlnets]


def _executor(
    settings: Settings,
    model: Model,
    denoiser: nn.Module | None,
    device: torch.device,
    log: Callable[[str], None],
    controlnets: list[ControlNet],
    engines: EngineSet | None = None,
) -> Executor:
    """The executor of a render, with the runner of its ControlNet units when it has some (`engines`:
    ready engines a benchmark brings)."""
    engines = engines or _engines(settings, model, denoiser, device, log, controlnets)
    if not controlnets:
        return Executor(engines)
    return Executor(engines, ControlRunner(engines.controlnets, residual_shapes(model, settings.height, settings.width)))


def _engines(
    settings: Settings,
    model: Model | None,
    denoiser: nn.Module | None,
    device: torch.device,
    log: Callable[[str], None],
    controlnets: list[ControlNet] = (),
) -> EngineSet:
    return open_engines(
        settings.backend,
        model=model,
        denoiser=denoiser,
        device=device,
        controlnets=[c.network for c in controlnets],
        height=settings.height,
        width=settings.width,
        max_batch=settings.max_batch,
        precision=settings.precision,
        engines_dir=Path(settings.engines) if settings.engines else default_engines_dir(),
        log=log,
        vae_precision=settings.vae_precision,
    )


IN_FLIGHT_CALLS = 4  # engine calls' worth of rows each pass may keep in flight


def _in_flight(settings: Settings) -> int:
    """Frames each pass keeps in flight: room for `IN_FLIGHT_CALLS` full engine calls of rows, since
    a pass starts one frame a round (`LoopPass`) and its jobs take several rounds each."""
    rows_per_frame = settings.n_iter * settings.batch_size * (2 if settings.cfg_scale > 1 else 1)
    return max(1, math.ceil(IN_FLIGHT_CALLS * settings.max_batch / rows_per_frame))


def pipeline_reach(settings: Settings) -> int:
    """How many input frames on each side an output frame depends on: every pass's temporal radius,
    plus FastDVDNet's 2 after each pass when it is on."""
    per_pass = len(settings.temporal_weights()) // 2 + (2 if settings.video_post_process_method == "fastdvdnet" else 0)
    return settings.loop_n * per_pass


class _Collect:
    """A sink that keeps frames in memory (for previews)."""

    def __init__(self, pass_number: int, on_frame: Callable[[int, Frame], None]) -> None:
        self.pass_number, self.on_frame = pass_number, on_frame

    def write(self, frame: Frame) -> None:
        self.on_frame(self.pass_number, frame)


def render_span(
    settings: Settings,
    input_spec: str,
    start: int,
    stop: int,
    *,
    model: Model,
    on_frame: Callable[[int, Frame], None],
    every_pass: bool = False,
    engine_log: Callable[[str], None] | None = None,
    cuts: Sequence[int] | None = None,
) -> dict[str, int]:
    """Render only output frames [start, stop), reading just the inputs they depend on.

    `on_frame(pass_number, frame)` receives the finished frames (pass_number = loop_n), and with
    `every_pass` each loop pass's frames too (1 … loop_n). `engine_log` hears of engines being
    built (none when `prepare_render` ran first). `cuts` are the scene cuts when known (a segmented
    render scans for them first); with `scene_cuts = auto` and none given, the input is read from
    its start so that detection sees what a whole render sees. Returns the engine call counts."""
    settings = concrete_seeds(settings)
    resolver = ParamResolver(settings, settings.seed, settings.subseed)
    progress = Progress(None, settings.loop_n, quiet=True)
    device = pick_device(settings.device)
    denoiser = _denoiser_with_notes(settings, model, progress.log)
    reach = pipeline_reach(settings)
    known = parse_cut_list(settings.scene_cuts) if cuts is None else tuple(cuts)
    if known is None:
        read_from, first, read_stop = 0, max(0, start - reach), stop + reach
    else:
        first, read_stop = span_reads(start, stop, reach, known)
        read_from = first
    with _open_source(settings, input_spec, None, start=read_from) as source:
        settings, prepare = _settle(settings, source.info, model, resolver, engine_log or progress.log, known)
        executor = _executor(
            settings, model, denoiser, device, engine_log or progress.log, load_controlnets(settings.controlnet, model)
        )
        stages, pass_ends = _render_stages(settings, model, resolver, executor, first)
        taps = {stage: _Collect(i + 1, on_frame) for i, stage in enumerate(pass_ends[:-1])} if every_pass else {}
        frames = takewhile(lambda f: f.index < read_stop, iter(source))
        if read_from > 0 and settings.color_correction == FIRST:  # 'first' colours need the shot's first frame
            shot = shot_start(known or (), first)
            if shot < first:
                frames = chain([_frame_at(settings, input_spec, shot)], frames)
        frames = prepare.frames(frames, first)
        with executor:
            Pipeline(stages, executor, sum(s.capacity for s in stages) or 1, taps).run(
                frames, _Collect(settings.loop_n, on_frame), progress, lambda frame: None, start, stop
            )
    return executor.engines.calls


@dataclass
class PreparedRender:
    """What a render of an input needs settled before its frames are split between processes."""

    settings: Settings  # with the render size made concrete
    frames: int  # exactly how many frames the input yields
    fps: Fraction  # of the output
    audio: Path | None  # the file whose sound a video output carries
    loras: list[dict]  # the LoRA files fused into the model (path, scale, sha256), for the settings file
    times: list[Fraction] | None  # each frame's time in seconds at a variable rate, else None
    controlnets: list[dict]  # each unit's ControlNet (model, sha256), for the settings file
    embeddings: list[dict]  # the textual-inversion files prompts may name (name, path, sha256), for the settings file
    cuts: tuple[int, ...]  # the scene cuts (given, or detected by a scan of the whole input)


def prepare_render(settings: Settings, input_spec: str, *, model: Model, log: Callable[[str], None]) -> PreparedRender:
    """Settle a render's size, frame count, rate and sound, check its schedules, and build every engine
    it needs into the engine cache. A segment-parallel render does this once, before its segments
    start, so that they only load the engines."""
    check_sampler(settings.sampler_name)
    denoiser = _denoiser_with_notes(settings, model, log)
    with _open_source(settings, input_spec, None, exact_count=True) as source:
        info = source.info
        settings, prepare = _settle(settings, info, model, ParamResolver(settings, settings.seed, settings.subseed), log)
    cuts = parse_cut_list(settings.scene_cuts)
    if cuts is None:
        log("vlrt: scene_cuts auto: scanning the input for cuts")
        with _open_source(settings, input_spec, None) as source:
            cuts = tuple(prepare.scan(iter(source)))
        log(f"vlrt: {len(cuts)} scene cut(s){': ' + ', '.join(map(str, cuts)) if cuts else ''}")
    controlnets = load_controlnets(settings.controlnet, model)
    _engines(settings, model, denoiser, pick_device(settings.device), log, controlnets)
    return PreparedRender(
        settings, info.frame_count, settings.output_fps(info.fps), audio_for(settings, info), model.loras,
        frame_times_for(settings, info), controlnet_records(controlnets), embedding_records(model.embeddings), cuts,
    )


def _settle(
    settings: Settings, info: SourceInfo, model: Model, resolver: ParamResolver, log: Callable[[str], None],
    cuts: Sequence[int] | None = None,
) -> tuple[Settings, Preparer]:
    """The render size made concrete (half of it for a draft, said in the log; checked against memory),
    the schedules and prompts tried at the first frame and the prepare step built, so that a bad size,
    schedule, prompt (syntax, embedding), mask or reference folder fails before any work."""
    width, height = frame_size(settings, info.width, info.height, model.vae_scale_factor)
    if settings.draft:
        full, (width, height) = (width, height), draft_size(width, height, model.vae_scale_factor)
        log(f"vlrt: {describe(settings, (width, height), full)}")
    device = pick_device(settings.device)
    backend = resolve_backend(settings.backend, device)
    width, height = fit_render_size(
        model, width, height, sized_by_user=settings.width is not None or settings.height is not None,
        rows=settings.max_batch, backend=backend, precision=precision_for(backend, device, settings.precision),
        device=device, log=log,
    )
    settings = replace(settings, width=width, height=height)
    warning = sdxl_size_warning(model, width, height)
    if warning:
        log(warning)
    resolver.check_all_first()
    first = resolver(0, 0)
    model.encode_pair(first.prompt, first.negative_prompt, prompt_steps(settings.sampler_name, first.steps), (height, width))
    return settings, Preparer(settings, info, width, height, model.device, cuts)


def _frame_at(settings: Settings, input_spec: str, index: int) -> Frame:
    """The input's frame `index` (a span that starts later needs its shot's first frame as the colour anchor)."""
    with _open_source(settings, input_spec, None, start=index) as source:
        return next(iter(source))


def _resume_point(settings: Settings, output_spec: str) -> tuple[Settings, int]:
    """The saved settings (checked against these) and the first frame still to render."""
    settings, recorded = resume_settings(settings, output_spec)
    if not recorded:
        return settings, 0
    if is_folder_output(output_spec):
        return settings, finished_folder_frames(output_spec)
    return settings, finished_video_frames(output_spec)


def _render_stages(
    settings: Settings, model: Model, resolver: ParamResolver, executor: Executor, first: int
) -> tuple[list[Stage], list[int]]:
    """The loop passes, each followed by FastDVDNet when asked; and the stage that ends each pass."""
    in_flight = _in_flight(settings)
    stages: list[Stage] = []
    pass_ends: list[int] = []
    for loop in range(settings.loop_n):
        stages.append(
            LoopPass(loop, settings=settings, model=model, resolver=resolver, executor=executor, in_flight=in_flight, first=first)
        )
        if settings.video_post_process_method == "fastdvdnet":
            stages.append(
                Denoise(
                    executor,
                    sigma=settings.fastdvdnet_noise_sigma,
                    alpha=settings.video_post_process_alpha,
                    rounding=settings.blend_rounding,
                    max_batch=settings.max_batch,
                    noise_seed_of=(settings.seed, loop),
                    whole_frame=settings.post_process_outside_mask,
                    first=first,
                )
            )
        pass_ends.append(len(stages) - 1)
    return stages, pass_ends


def _open_source(settings: Settings, spec: str, stdin: BinaryIO | None, start: int = 0, exact_count: bool = False) -> Source:
    size = None
    if settings.input_size:
        try:
            w, h = (int(v) for v in settings.input_size.lower().split("x"))
            size = (w, h)
        except ValueError:
            raise VlrtError(f"--input-size {settings.input_size!r} is not WxH, e.g. 640x360") from None
    return open_source(
        spec,
        extract_nth_frame=settings.extract_nth_frame,
        max_frames=settings.max_frames,
        is_continue=settings.is_continue,
        input_format=settings.input_format,
        input_size=size,
        input_fps=Fraction(settings.input_fps).limit_denominator(1001) if settings.input_fps else None,
        stdin=stdin,
        start=start,
        exact_count=exact_count,
        deinterlace=settings.deinterlace != "off",
    )


def _open_sink(
    settings: Settings, spec: str, fps: Fraction, audio: Path | None, stdout: BinaryIO | None, resume_at: int = 0,
    times: list[Fraction] | None = None,
) -> Sink:
    return open_sink(
        spec,
        fps=fps,
        audio_from=audio,
        codec=settings.codec,
        crf=settings.crf,
        lossless=settings.lossless,
        output_format=settings.output_format,
        stdout=stdout,
        resume_at=resume_at,
        times=times,
    )
