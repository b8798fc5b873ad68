"""Resuming: a render SIGKILLed at any moment, or stopped by SIGTERM, an engine error or a full
disk, then run again with --resume, gives exactly the frames of an uninterrupted render; a video
file is kept as whole parts until it is joined. A closed output pipe ends a render in one line."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import read_frames, write_frames

from vlrt.cli import main
from vlrt.demo.clip import sample_frames, write_sample_clip
from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.io.parts import PART_FRAMES, part_path, parts_folder
from vlrt.io.sinks import finished_frames, open_sink
from vlrt.io.sources import open_source

FRAMES = 70  # three parts: 32 + 32 + 6
SIZE = (32, 32)
FPS = Fraction(24)
# The renders are short, so they use parts of 4 frames to have several: 4 + 4 + 4.
RENDERED, SMALL_PARTS = 12, 4
# --max-batch 1: on CPU a batched UNet call rounds differently from the same rows in another batch
# (±1 levels), and a resumed run starts its batches at another frame; these tests are about what
# the output keeps across a kill, so every run computes each frame alone.
RENDER = [
    "--model", "demo", "--loop-n", "2", "--steps", "2", "--denoising-strength", "0.5",
    "--temporal-superimpose-alpha-list", "0.25,0.5,0.25", "--seed", "7", "--cfg-scale", "1", "--max-batch", "1",
    "--backend", "torch", "--quiet",
]
# `vlrt` with SMALL_PARTS; with `slow_join`, the join, once done, waits before the joined file is
# renamed into place, so the test can kill the render in that window (otherwise milliseconds long).
LAUNCHER = """
import sys, time
import vlrt.io.parts, vlrt.io.sinks
vlrt.io.parts.PART_FRAMES = {parts}
if {slow_join}:
    join = vlrt.io.sinks.join_parts
    vlrt.io.sinks.join_parts = lambda *args, **kwargs: (join(*args, **kwargs), time.sleep(600))
from vlrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    return sample_frames(FRAMES, SIZE)


def write_all(path: Path, frames: list[Frame], **kwargs) -> None:
    with open_sink(str(path), fps=FPS, **kwargs) as sink:
        for frame in frames:
            sink.write(frame)


def frames_of(pictures: list[np.ndarray], start: int = 0) -> list[Frame]:
    return [Frame(start + i, p) for i, p in enumerate(pictures)]


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def decoded(path: Path) -> list[np.ndarray]:
    return [frame.image for frame in open_source(str(path))]


def part_names(output: Path) -> list[str]:
    folder = parts_folder(output)
    return sorted(os.listdir(folder)) if folder.is_dir() else []


# --- the parts of a video file -------------------------------------------------------------


def test_finished_frames_counts_whole_parts_from_the_first(tmp_path, pictures):
    assert PART_FRAMES == 32  # the part names in these tests
    out = tmp_path / "out.mkv"
    folder = parts_folder(out)
    sink = open_sink(str(out), fps=FPS, lossless=True)
    for frame in frames_of(pictures):
        sink.write(frame)
    wait_for(lambda: folder.joinpath("00000064.mkv.tmp").exists())
    sink.abort()  # the third part was being written: it is dropped, the two whole ones stay
    assert not out.exists()
    assert part_names(out) == ["00000000.mkv", "00000032.mkv"]
    assert finished_frames(out) == 64

    (folder / "00000064.mkv.tmp").write_bytes(b"cut off by a kill")
    (folder / "00000064.mkv").write_bytes(b"not a video")  # unreadable: not counted, written again
    assert finished_frames(out) == 64
    assert part_names(out) == ["00000000.mkv", "00000032.mkv"]

    part_path(folder, 32).rename(part_path(folder, 40))  # a gap after the first part
    assert finished_frames(out) == 32
    assert part_names(out) == ["00000000.mkv"]
    with pytest.raises(VlrtError, match="hold 32 frames"):
        open_sink(str(out), fps=FPS, lossless=True, resume_at=40)

    write_all(out, frames_of(pictures[:5]), lossless=True)  # a fresh render: the old parts go first
    assert sorted(os.listdir(tmp_path)) == ["out.mkv"]
    assert len(decoded(out)) == 5
    assert finished_frames(out) == 0


def test_failed_render_keeps_parts_and_resume_is_bit_exact(tmp_path, pictures):
    out = tmp_path / "out.mp4"
    with pytest.raises(KeyError):
        with open_sink(str(out), fps=FPS, lossless=True) as sink:
            for frame in frames_of(pictures[:45]):
                sink.write(frame)
            wait_for(lambda: part_path(parts_folder(out), 0).exists())
            raise KeyError("the render failed")
    assert not out.exists()
    assert finished_frames(out) == 32

    with open_sink(str(out), fps=FPS, lossless=True, resume_at=32) as sink:
        for frame in frames_of(pictures[32:], start=32):
            sink.write(frame)
    assert os.listdir(tmp_path) == ["out.mp4"]  # the parts folder is gone
    got = decoded(out)
    assert len(got) == FRAMES
    for image, picture in zip(got, pictures):
        np.testing.assert_array_equal(image, picture)


def test_x264_parts_from_separate_sessions_share_one_stream_header(tmp_path, pictures):
    out = tmp_path / "out.mp4"
    noise = np.random.default_rng(5).integers(0, 256, (*SIZE[::-1], 3), dtype=np.uint8)
    sink = open_sink(str(out), fps=FPS)
    for frame in frames_of(pictures[:32] + [noise] * 33):  # two parts of very different pictures
        sink.write(frame)
    wait_for(lambda: part_path(parts_folder(out), 32).exists())
    sink.abort()
    headers = []
    for first in (0, 32):
        with av.open(str(part_path(parts_folder(out), first))) as part:
            headers.append(part.streams.video[0].codec_context.extradata)
    assert headers[0] and headers[0] == headers[1]


def test_joined_default_mp4_is_h264_yuv420p_with_count_rate_order_and_sound(tmp_path, pictures):
    clip = write_sample_clip(tmp_path / "clip.mp4", frames=FRAMES + 2, fps=24, size=SIZE)
    out = tmp_path / "out.mp4"
    write_all(out, frames_of(pictures), audio_from=clip)
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "out.mp4"]
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        times = [frame.time for frame in container.decode(video)]
        assert (video.codec_context.name, video.codec_context.pix_fmt, video.average_rate) == ("h264", "yuv420p", 24)
        [audio] = container.streams.audio
        assert audio.codec_context.name == "aac"
    assert times == pytest.approx([i / 24 for i in range(FRAMES)])
    with av.open(str(out)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.pts is not None]
        end = float((packets[-1].pts + packets[-1].duration) * stream.time_base)
    assert end == pytest.approx(FRAMES / 24, abs=0.03)  # cut to the video, within one audio packet
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart
    got = decoded(out)
    for i, image in enumerate(got):  # each frame is in its place, across the part boundaries too
        errors = {j: np.abs(image.astype(int) - pictures[j]).mean() for j in range(max(0, i - 1), min(FRAMES, i + 2))}
        assert min(errors, key=errors.get) == i and errors[i] < 10  # 4:2:0 of a 32x32 texture


# --- killed renders, resumed ---------------------------------------------------------------
# The uninterrupted references and the last resumes run in this process (no second start-up
# of torch); the runs to kill are subprocesses with the same number of torch threads, so
# every run computes the frames the same way.


@pytest.fixture(scope="module")
def source(tmp_path_factory, pictures) -> Path:
    return write_frames(tmp_path_factory.mktemp("resume") / "in", pictures[:RENDERED])


def render_args(source: Path, output: str, *extra: str) -> list[str]:
    return ["render", str(source), "-o", output, *RENDER, *extra]


def render_here(args: list[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("vlrt.io.parts.PART_FRAMES", SMALL_PARTS)
        assert main(args) == 0


def appears(*paths: Path) -> Callable[[], bool]:
    return lambda: any(path.exists() for path in paths)


def kill_when(args: list[str], ready: Callable[[], bool], log: Path, *, slow_join: bool = False) -> None:
    """Run `vlrt ARGS` in a subprocess and SIGKILL it as soon as `ready()` holds."""
    launcher = LAUNCHER.format(parts=SMALL_PARTS, slow_join=slow_join)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", launcher, *args], stderr=stderr, env=env)
        try:
            wait_for(lambda: ready() or process.poll() is not None, timeout=300)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -9, f"the render ended before the kill point: {log.read_text()}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, source) -> list[np.ndarray]:
    """An uninterrupted render to PNGs; an uninterrupted lossless video holds the same frames."""
    folder = tmp_path_factory.mktemp("reference")
    render_here(render_args(source, f"{folder}/frames/"))
    render_here(render_args(source, str(folder / "out.mp4"), "--lossless"))
    frames = read_frames(folder / "frames")
    video = decoded(folder / "out.mp4")
    assert len(frames) == len(video) == RENDERED
    for png, image in zip(frames, video):
        np.testing.assert_array_equal(png, image)
    return frames


def resume_to_reference(args: list[str], out: Path, reference: list[np.ndarray]) -> None:
    """Run ARGS with --resume to completion: the PNG folder OUT then holds the reference frames."""
    render_here([*args, "--resume"])
    got = read_frames(out)
    assert len(got) == RENDERED
    for image, expected in zip(got, reference):
        np.testing.assert_array_equal(image, expected)


def test_killed_png_render_resumes_to_the_same_frames(tmp_path, source, reference):
    out = tmp_path / "frames"
    args = render_args(source, f"{out}/")
    kill_when(args, appears(out / "000005.png"), tmp_path / "log")  # mid-render
    resume_to_reference(args, out, reference)


def test_killed_video_render_resumes_to_the_same_frames(tmp_path, source, reference):
    out = tmp_path / "out.mp4"
    folder = parts_folder(out)
    args = render_args(source, str(out), "--lossless")
    log = tmp_path / "log"

    kill_when(args, appears(folder / "00000000.mkv.tmp", part_path(folder, 0)), log)  # early: the first output frame
    assert not out.exists() and finished_frames(out) < RENDERED

    # Mid-render: frames of the second part are being encoded.
    kill_when([*args, "--resume"], appears(folder / "00000004.mkv.tmp", part_path(folder, 4)), log)
    assert not out.exists() and finished_frames(out) >= 4

    # During the final join: every part is whole, the joined file is not yet in place.
    kill_when([*args, "--resume"], appears(folder / "out.mp4.tmp"), log, slow_join=True)
    assert not out.exists() and finished_frames(out) == RENDERED
    assert part_names(out) == ["00000000.mkv", "00000004.mkv", "00000008.mkv"]

    render_here([*args, "--resume"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "out.mp4", "out.mp4.settings.toml"]
    got = decoded(out)
    assert len(got) == RENDERED
    for image, expected in zip(got, reference):
        np.testing.assert_array_equal(image, expected)


# --- renders stopped by a signal, an engine error or a full disk, then resumed ------------------


def test_sigterm_stops_cleanly_says_how_to_resume_and_resume_finishes(tmp_path, source, reference):
    out = tmp_path / "frames"
    args = render_args(source, f"{out}/")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    launcher = LAUNCHER.format(parts=SMALL_PARTS, slow_join=False)
    process = subprocess.Popen([sys.executable, "-c", launcher, *args], stderr=subprocess.PIPE, env=env)
    try:
        wait_for(lambda: (out / "000003.png").exists() or process.poll() is not None, timeout=300)
        process.send_signal(signal.SIGTERM)
        err = process.communicate(timeout=120)[1].decode().strip()
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.splitlines() == ["vlrt: interrupted (finished frames are kept: run the same command with --resume to continue)"]
    assert 4 <= len(read_frames(out)) < RENDERED
    resume_to_reference(args, out, reference)


def test_an_engine_error_mid_render_names_the_frame_and_resume_finishes(tmp_path, source, reference, capsys, monkeypatch):
    from vlrt.engines.torch_engine import TorchEngine

    run, calls = TorchEngine._run, []

    def failing(self, feed):
        calls.append(self.component)
        if len(calls) == 40:  # of 72: 12 frames × 2 passes × (encode, UNet, decode)
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return run(self, feed)

    out = tmp_path / "frames"
    args = render_args(source, f"{out}/")
    with monkeypatch.context() as patch:
        patch.setattr(TorchEngine, "_run", failing)
        patch.setattr("vlrt.io.parts.PART_FRAMES", SMALL_PARTS)
        assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vlrt: error: the engines failed while rendering frame "), err
    assert "CUDA error: an illegal memory access was encountered; finished frames are kept" in err and "--resume" in err
    kept = len(read_frames(out))
    assert 0 < kept < RENDERED
    resume_to_reference(args, out, reference)


def test_a_full_disk_names_the_frame_that_failed_and_resume_finishes(tmp_path, source, reference, capsys, monkeypatch):
    import vlrt.io.sinks

    write_png = vlrt.io.sinks.write_png

    def disk_full(path, image, alpha):
        if path.name == "000006.png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_png(path, image, alpha)

    out = tmp_path / "frames"
    args = render_args(source, f"{out}/")
    with monkeypatch.context() as patch:
        patch.setattr(vlrt.io.sinks, "write_png", disk_full)
        assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("vlrt: error: writing frame 6 to the output failed: No space left on device; finished frames are kept: "
                   "free space or fix the output, then run the same command with --resume")
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    resume_to_reference(args, out, reference)


def test_a_closed_output_pipe_ends_the_render_with_one_line_and_status_3(source):
    """The reader (`vlrt render … -o - | head -c N`) goes away after a frame: no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, "-m", "vlrt", *render_args(source, "-"), "--output-format", "rawvideo"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = process.stdout.read(SIZE[0] * SIZE[1] * 3)
    process.stdout.close()
    err = process.stderr.read().decode().strip()
    process.wait(timeout=300)
    assert len(first) == SIZE[0] * SIZE[1] * 3
    assert process.returncode == 3, err
    assert "\n" not in err and err.startswith("vlrt: error: output pipe closed by the reader"), err
