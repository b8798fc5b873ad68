"""Segment-parallel rendering on Ray: the frames of one render, made by many processes (DESIGN.md §8).

The driver (this process) checks the request, makes −1 seeds concrete once, and connects to Ray:
`auto` starts a local instance (on the loopback address, without usage reporting) and stops it at
the end; an address joins an existing cluster, whose nodes must all see the input, the output's
folder, the model and the engine cache (`--engines`) at the same paths. Then:

1. One task with a segment's resources runs `pipeline.prepare_render`: the render size, the input's exact
   frame count, and every engine the render needs, built into the engine cache, so that the segment
   tasks only load them (on a cluster a TensorRT plan is built where the segments run).
2. The frames are split into contiguous segments (`vlrt.scale.segments`), each rendered by its own task
   with `pipeline.render_span`, which reads the input from the start of the segment's halo (a video
   file seeks) and gives only the segment's own frames. A task writes them straight into the output:
   PNGs into an output folder, or for a video file the segment's parts (`vlrt.io.segment_parts`),
   which count only once the whole segment is sealed.
3. The tasks report their frame counts to a small actor (`vlrt.scale.segment_progress`); the driver shows
   one progress bar.
4. For a video file the driver joins the segments' parts in order without re-encoding and muxes the
   source's sound once (`vlrt.io.sinks.join_video`).

A task whose worker process dies (killed, out of memory, its node lost) is run again by Ray, up to
`RETRIES` times; an error raised by a task is not retried (it would happen again): it stops the render,
keeping the finished segments, and `--resume` then renders only the segments not finished.

Test hook: `VLRT_TEST_KILL_SEGMENT=K:MARKER` makes the task of segment K (0-based), when file
MARKER does not exist yet, create it and SIGKILL its own worker process after writing its first frame;
the test suite uses it to check that a worker's death is retried and changes no frame.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.io.parts import Part
from vlrt.io.segment_parts import keep_only, segment_parts
from vlrt.io.sinks import check_output_spec, join_video, open_sink
from vlrt.render.pipeline import (
    PreparedRender,
    RenderResult,
    concrete_seeds,
    open_model,
    pick_device,
    pipeline_reach,
    prepare_render,
    render_span,
)
from vlrt.render.progress import Progress
from vlrt.render.run_state import (
    check_same_controlnets,
    check_same_embeddings,
    check_same_loras,
    is_folder_output,
    resume_settings,
    write_settings,
)
from vlrt.scale.segment_progress import FrameCounter
from vlrt.scale.segments import Segment, halo_overhead, split
from vlrt.settings.config import Settings

RETRIES = 3
TEST_KILL_ENV = "VLRT_TEST_KILL_SEGMENT"
REPORT_EVERY_S = 0.5
CONNECT_TIMEOUT_S = 10
# A local instance carries no frames in its object store (they go through files): keep it small.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
QUIET = dict(logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)


def render_segments(
    settings: Settings,
    input_spec: str,
    output_spec: str,
    *,
    segments: int,
    ray_address: str = "auto",
    gpus_per_segment: float | None = None,
    quiet: bool = False,
    resume: bool = False,
) -> RenderResult:
    """Render INPUT to OUTPUT in `segments` Ray tasks; the frames equal those of `pipeline.render`.

    `gpus_per_segment` None takes one GPU per segment where the cluster has GPUs (and the device is
    not the CPU), else none."""
    _check_request(settings, input_spec, output_spec, segments, gpus_per_segment)
    ray = import_ray(local=ray_address == "auto")
    if resume:
        settings, _ = resume_settings(settings, output_spec)
    settings = concrete_seeds(settings)
    progress = Progress(None, segments, quiet, parts_label="S")
    started = time.perf_counter()
    with _connected(ray, ray_address):
        options = dict(num_cpus=1, num_gpus=_gpus_per_task(ray, gpus_per_segment, settings.device),
                       max_retries=RETRIES, retry_exceptions=False)
        prepared, messages = _get(ray, ray.remote(_prepare).options(**options).remote(settings, input_spec), "preparing the render")
        for message in messages:
            progress.log(message)
        settings = prepared.settings
        if resume:
            check_same_loras(output_spec, prepared.loras)
            check_same_controlnets(output_spec, prepared.controlnets)
            check_same_embeddings(output_spec, prepared.embeddings)
        reach = pipeline_reach(settings)
        plan = split(prepared.frames, segments, reach, prepared.cuts)
        _describe(plan, segments, reach, progress)
        keep_only(Path(output_spec), [(s.start, s.stop) for s in plan] if resume else [])
        write_settings(settings, input_spec, output_spec, None, prepared.loras, controlnets=prepared.controlnets,
                       embeddings=prepared.embeddings, cuts=list(prepared.cuts))
        todo = [s for s in plan if not _finished(output_spec, s)] if resume else plan
        if resume:
            progress.log(f"vlrt: resuming: {len(plan) - len(todo)} of {len(plan)} segments are finished")
        calls = _run(ray, options, settings, input_spec, output_spec, prepared.fps, todo, progress, prepared.cuts)
    if not is_folder_output(output_spec):
        join_video(_all_parts(Path(output_spec), plan), Path(output_spec), prepared.fps, prepared.audio, prepared.times)
    write_settings(settings, input_spec, output_spec, prepared.frames, prepared.loras, controlnets=prepared.controlnets,
                   embeddings=prepared.embeddings, cuts=list(prepared.cuts))
    seconds = time.perf_counter() - started
    progress.log(f"vlrt: wrote {prepared.frames} frames to {output_spec} in {seconds:.1f} s ({len(plan)} segments)")
    return RenderResult(prepared.frames, output_spec, settings, calls, seconds)


def import_ray(local: bool) -> Any:
    """Ray, or a one-line error saying how to install it. A `local` instance listens on the loopback
    address only, and no Ray process started from here reports usage."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
    try:
        import ray
    except ImportError:
        raise VlrtError("--segments needs Ray, which is not installed: pip install 'vlrt[ray]' (or pip install 'ray[default]')") from None
    return ray


def _check_request(settings: Settings, input_spec: str, output_spec: str, segments: int, gpus: float | None) -> None:
    if segments < 1:
        raise VlrtError(f"--segments {segments}: give 1 or more segments")
    if gpus is not None and gpus < 0:
        raise VlrtError(f"--gpus-per-segment {gpus:g}: give 0 or more (a fraction shares a GPU between segments)")
    if input_spec == "-":
        raise VlrtError("standard input cannot be split into segments (it can be read only once, in order): "
                        "save it to a file first, or render without --segments")
    if output_spec == "-":
        raise VlrtError("--segments needs a file or folder output, not standard output: render without --segments to stream")
    if settings.save_every_loop:
        raise VlrtError("--save-every-loop is not made by segmented renders: render without --segments for the per-pass videos")
    check_output_spec(output_spec, codec=settings.codec, crf=settings.crf, lossless=settings.lossless)


@contextmanager
def _connected(ray: Any, address: str) -> Iterator[None]:
    """This process connected to Ray. A connection the caller already made is used and left open."""
    reuse = ray.is_initialized()
    try:
        if address != "auto":
            _check_reachable(address)
        if reuse:
            current = ray.get_runtime_context().gcs_address
            if address not in ("auto", current):
                raise RuntimeError(f"this process is already connected to Ray at {current}")
        elif address == "auto":
            start_local_ray(ray, os.cpu_count() or 1)
        else:
            ray.init(address=address, **QUIET)
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlrtError(f"cannot connect to Ray at {address!r} ({reason}): start the cluster (ray start --head), "
                        "check the address, or use --ray auto for a local instance") from None
    try:
        yield
    finally:
        if not reuse:
            ray.shutdown()  # stops a local instance; leaves a cluster running


def start_local_ray(ray: Any, cpus: int) -> None:
    """Start a local Ray instance with `cpus` CPUs (and the GPUs Ray finds) and connect to it, quietly."""
    ray.init(address="local", num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **QUIET)


def _check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at a host:port address (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()


def _gpus_per_task(ray: Any, asked: float | None, device: str) -> float:
    """The GPUs each task asks Ray for: as given (a cluster without that many is an error, not a
    wait), else one where the cluster has GPUs and the device is not the CPU."""
    available = ray.cluster_resources().get("GPU", 0)
    if asked is None:
        return 1 if available and device != "cpu" else 0
    if asked > available:
        raise VlrtError(f"--gpus-per-segment {asked:g}: the Ray cluster has {available:g} GPUs; "
                        "ask for at most that many (0 renders on CPUs)")
    return asked


def _describe(plan: list[Segment], asked: int, reach: int, progress: Progress) -> None:
    if len(plan) < asked:
        progress.log(f"vlrt: the input has {len(plan)} frames: rendering {len(plan)} segments, not {asked}")
    sizes = sorted({s.frames for s in plan})
    progress.log(
        f"vlrt: {len(plan)} segments of {'–'.join(map(str, sizes[::len(sizes) - 1 or 1]))} frames with halos of {reach} "
        f"frames: {halo_overhead(plan):.0%} more frames rendered than by one process"
    )


def _finished(output_spec: str, segment: Segment) -> bool:
    """Whether the output already holds the whole segment (a PNG file, or a segment's parts, is whole or absent)."""
    if is_folder_output(output_spec):
        return all((Path(output_spec) / f"{i:06d}.png").is_file() for i in range(segment.start, segment.stop))
    return segment_parts(Path(output_spec), segment.start, segment.stop) is not None


def _all_parts(output: Path, plan: list[Segment]) -> list[Part]:
    """The parts of every segment, in order, for the join."""
    parts: list[Part] = []
    for s in plan:
        found = segment_parts(output, s.start, s.stop)
        if found is None:
            raise VlrtError(f"the parts of frames {s.start}-{s.stop - 1} of '{output}' went missing before the join "
                            "(another render of the same output?): run the same command with --resume")
        parts += found
    return parts


def _run(
    ray: Any, options: dict, settings: Settings, input_spec: str, output_spec: str, fps: Fraction,
    todo: list[Segment], progress: Progress, cuts: tuple[int, ...],
) -> dict[str, int]:
    """Render the segments in `todo` as Ray tasks, showing their progress; the engine calls they made."""
    counter = ray.remote(num_cpus=0)(FrameCounter).remote()
    task = ray.remote(_render_segment).options(**options)
    hook = os.environ.get(TEST_KILL_ENV)
    pending = {task.remote(settings, input_spec, output_spec, s, fps, counter, hook, cuts): s for s in todo}
    progress.set_total(sum(s.frames for s in todo))
    calls: dict[str, int] = {}
    finished: dict[int, int] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=REPORT_EVERY_S)
            for ref in ready:
                segment = pending.pop(ref)
                result = _get(ray, ref, f"segment {segment.index + 1} (frames {segment.start}-{segment.stop - 1})")
                for message in result.messages:
                    progress.log(message)
                for name, n in result.calls.items():
                    calls[name] = calls.get(name, 0) + n
                finished[segment.index] = segment.frames
            done = {**ray.get(counter.frames.remote()), **finished}
            progress.update(sum(done.values()), [done.get(s.index, 0) for s in todo])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        progress.close()
    return calls


def _get(ray: Any, ref: Any, what: str) -> Any:
    """A task's result; its failure as one line saying what failed and what to do."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if exc.cause is not None else exc
        if isinstance(cause, VlrtError):
            raise VlrtError(f"{what}: {cause}") from None
        raise
    except ray.exceptions.RayError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlrtError(
            f"{what} failed {RETRIES + 1} times ({type(exc).__name__}: {reason}); finished segments are kept: "
            "fix the cause (memory? a lost node?) and run the same command with --resume"
        ) from None


@dataclass
class SegmentResult:
    calls: dict[str, int]
    messages: list[str] = field(default_factory=list)


def _prepare(settings: Settings, input_spec: str) -> tuple[PreparedRender, list[str]]:
    """The preparation task: `pipeline.prepare_render`, and what it had to say."""
    messages: list[str] = []
    with one_thread():
        model = open_model(settings, pick_device(settings.device))
        return prepare_render(settings, input_spec, model=model, log=messages.append), messages


def _render_segment(
    settings: Settings, input_spec: str, output_spec: str, segment: Segment, fps: Fraction, counter: Any,
    kill_hook: str | None, cuts: tuple[int, ...],
) -> SegmentResult:
    """One segment's task: render its frames into the output; a video file's share is sealed when whole."""
    model = open_model(settings, pick_device(settings.device))
    sink = open_sink(output_spec, fps=fps, codec=settings.codec, crf=settings.crf, lossless=settings.lossless,
                     segment=(segment.start, segment.stop))
    messages: list[str] = []
    written, reported = 0, time.monotonic()

    def on_frame(_pass: int, frame: Frame) -> None:
        nonlocal written, reported
        sink.write(frame)
        written += 1
        if kill_hook:
            _test_kill(kill_hook, segment.index)
        if time.monotonic() - reported > REPORT_EVERY_S:
            counter.report.remote(segment.index, written)
            reported = time.monotonic()

    try:
        with one_thread():
            calls = render_span(settings, input_spec, segment.start, segment.stop, model=model, on_frame=on_frame,
                                engine_log=messages.append, cuts=cuts)
        if written != segment.frames:
            raise VlrtError(
                f"frames {segment.start}-{segment.stop - 1} of {input_spec} gave {written} frames, not {segment.frames} "
                "(is the video damaged?): render without --segments"
            )
        sink.close()
    except OSError as exc:
        sink.abort()
        raise VlrtError(f"writing frames {segment.start}-{segment.stop - 1} failed: {exc.strerror or exc}; "
                        "free space or fix the output, then run the same command with --resume") from exc
    except BaseException:
        sink.abort()
        raise
    counter.report.remote(segment.index, written)
    return SegmentResult(calls, messages)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread, as every segment task computes. A task asks Ray for one CPU, so more
    segments use more cores and tasks sharing cores do not wait on each other's thread pools. On the
    CPU a one-process render equals a segmented one bit for bit only on one thread too: torch's
    kernels split their sums by thread, so another count can round a value differently."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _test_kill(hook: str, segment: int) -> None:
    """The test hook of the module docstring."""
    index, _, marker = hook.partition(":")
    if int(index) == segment and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)

