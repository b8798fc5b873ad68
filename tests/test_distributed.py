"""Segment-parallel rendering on Ray: a render split into segments, each with its halo, gives the
frames of one render bit for bit, through a worker killed mid-render and through a driver killed
and resumed; Ray is started and stopped, or joined; bad requests are one clear line.

The renders share one local Ray instance with 2 CPUs (started once: it takes seconds), except the
tests of `--ray auto`, which start their own, and of `--ray ADDRESS`, which join the shared one
from another process. The clip is 30 frames of 32×32 with loop_n 3, a 3-tap temporal list and
FastDVDNet after every pass (reach 3 × (1 + 2) = 9 frames), the demo model with one UNet step, and
colours matched to the first frame (which every segment must then read, halo or not).
`--max-batch 1`: on the CPU a batched UNet call can round a row differently from the same row in a
batch of another size, and a segment's batches start at other frames than one render's (the same
reason as in test_resume.py); and the one-process renders compute on one thread as the segment
tasks do (`vlrt.scale.distributed.one_thread` says why). This suite checks what segmenting itself guarantees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import tomllib
from conftest import read_frames, shot_frames, write_frames
from PIL import Image

from vlrt.cli import main
from vlrt.demo.clip import sample_frames, write_sample_clip
from vlrt.io.parts import parts_folder
from vlrt.io.segment_parts import segment_folder
from vlrt.io.sources import open_source
from vlrt.scale.distributed import import_ray, one_thread, start_local_ray
from vlrt.scale.segments import split

FRAMES, SIZE = 30, (32, 32)
RENDER = [
    "--model", "demo", "--backend", "torch", "--loop-n", "3", "--steps", "2", "--denoising-strength", "0.5",
    "--temporal-superimpose-alpha-list", "0.25,0.5,0.25", "--video-post-process-method", "fastdvdnet",
    "--seed", "7", "--cfg-scale", "1", "--max-batch", "1", "--color-correction", "first",
]
REACH = 9


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance with 2 CPUs for this module; yields its address."""
    ray = import_ray(local=True)
    start_local_ray(ray, 2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """H.264 with B-frames and AAC sound: segments seek into it."""
    return write_sample_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=FRAMES, fps=24, size=SIZE)


@pytest.fixture(scope="module")
def reference_render(tmp_path_factory, clip) -> Path:
    """One render (frames in out/, and preview.png) in this process, without Ray."""
    folder = tmp_path_factory.mktemp("reference")
    with one_thread():
        assert main(["render", str(clip), "-o", f"{folder}/out/", *RENDER, "--quiet", "--preview", str(folder / "preview.png")]) == 0
    return folder


@pytest.fixture(scope="module")
def reference(reference_render) -> list[np.ndarray]:
    """The frames of that one render."""
    frames = read_frames(reference_render / "out")
    assert len(frames) == FRAMES
    return frames


def decoded(path: Path) -> list[np.ndarray]:
    return [frame.image for frame in open_source(str(path))]


def assert_same_frames(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert np.array_equal(g, e), f"frame {i} differs (max {np.abs(g.astype(int) - e.astype(int)).max()})"


class FakeTerminal:
    """Standard error as a terminal, so the progress bar is drawn; keeps what was written."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_three_segments_give_the_frames_of_one_render_with_one_progress_bar(ray_cluster, clip, reference, tmp_path,
                                                                            monkeypatch):
    # The frames change from pass to pass and from frame to frame, so a segment that missed its halo
    # (or seeked to a wrong frame) could not match.
    inputs = [f.image for f in open_source(str(clip))]
    assert np.abs(reference[15].astype(int) - inputs[15].astype(int)).mean() > 2
    assert np.abs(reference[9].astype(int) - reference[10].astype(int)).mean() > 0.5
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["render", str(clip), "-o", f"{tmp_path / 'out'}/", *RENDER, "--segments", "3"]) == 0
    assert_same_frames(read_frames(tmp_path / "out"), reference)
    assert "3 segments of 10 frames with halos of 9 frames: 120% more frames" in terminal.text
    bars = [line for line in terminal.text.replace("\r", "\n").splitlines() if "S1:" in line]
    assert bars and "30/30" in bars[-1] and "S1:10 S2:10 S3:10" in bars[-1]  # one bar over all segments
    settings = (tmp_path / "out" / "settings.toml").read_text()
    assert "complete = true" in settings and "seed = 7" in settings


def test_the_preview_of_a_segmented_render_is_that_of_one_render(ray_cluster, clip, reference_render, tmp_path):
    """No process sees every frame, so the driver reads the sheet's frames back from input and output."""
    preview = tmp_path / "preview.png"
    assert main(["render", str(clip), "-o", f"{tmp_path}/out/", *RENDER, "--segments", "3", "--ray", ray_cluster,
                 "--preview", str(preview), "--quiet"]) == 0
    one_render = np.asarray(Image.open(reference_render / "preview.png"))
    assert one_render.shape[0] > 2 * SIZE[1]  # two rows of frames: inputs above outputs
    assert np.array_equal(np.asarray(Image.open(preview)), one_render)


def test_without_the_halo_the_middle_segment_would_differ(ray_cluster, clip, reference, tmp_path):
    """The control for the test above: the middle segment's frames rendered from its own frames alone
    (a cut of the clip, no halo) are not the reference's, so equality above means the halo was used."""
    cut = tmp_path / "cut"
    cut.mkdir()
    for frame in open_source(str(clip), start=10):
        if frame.index < 20:
            av.VideoFrame.from_ndarray(frame.image, format="rgb24").to_image().save(cut / f"{frame.index:04d}.png")
    with one_thread():
        assert main(["render", f"{cut}/", "-o", f"{tmp_path / 'out'}/", *RENDER, "--quiet"]) == 0
    alone = read_frames(tmp_path / "out")
    assert len(alone) == 10
    assert not np.array_equal(alone[0], reference[10])
    assert not np.array_equal(alone[9], reference[19])


def test_a_killed_worker_is_retried_and_the_video_is_the_same(ray_cluster, clip, reference, tmp_path, monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("VLRT_TEST_KILL_SEGMENT", f"1:{marker}")
    out = tmp_path / "out.mkv"
    assert main(["render", str(clip), "-o", str(out), *RENDER, "--segments", "3", "--lossless", "--quiet"]) == 0
    assert marker.exists()  # segment 1's worker did kill itself once, after its first frame
    assert_same_frames(decoded(out), reference)
    assert sorted(os.listdir(tmp_path)) == ["killed-once", "out.mkv", "out.mkv.settings.toml"]  # parts joined, gone


def ray_processes() -> set[int]:
    """Ray's own server processes on this machine (their command lines name them)."""
    found = set()
    for pid in os.listdir("/proc"):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if pid.isdigit() and (b"raylet" in command or b"gcs_server" in command):
            found.add(int(pid))
    return found


def vlrt_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlrt", *args]


def test_ray_auto_starts_a_local_instance_and_stops_it_and_the_sound_is_muxed_once(tmp_path):
    clip = write_sample_clip(tmp_path / "clip.mp4", frames=8, fps=24, size=SIZE)
    out = tmp_path / "out.mp4"
    before = ray_processes()
    done = subprocess.run(
        vlrt_command("render", str(clip), "-o", str(out), "--model", "demo", "--backend", "torch", "--loop-n", "1",
                     "--steps", "2", "--segments", "2", "--ray", "auto"),
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 8 frames" in done.stderr
    deadline = time.monotonic() + 30
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before  # the instance it started is gone
    with av.open(str(out)) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        assert container.streams.video[0].codec_context.name == "h264"
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert sum(1 for p in container.demux(video) if p.size) == 8
        assert abs(float(audio.duration * audio.time_base) - 8 / 24) < 0.05


def test_a_killed_driver_resumes_with_only_the_missing_segments(ray_cluster, clip, reference, tmp_path):
    out = tmp_path / "out.mp4"
    command = vlrt_command("render", str(clip), "-o", str(out), *RENDER, "--segments", "3", "--lossless",
                           "--ray", ray_cluster)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    segments = [segment_folder(out, s.start, s.stop) for s in split(FRAMES, 3, REACH)]
    deadline = time.monotonic() + 600
    while not any(folder.is_dir() for folder in segments):
        assert driver.poll() is None, driver.stderr.read().decode()
        assert time.monotonic() < deadline, "no segment finished"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = sum(folder.is_dir() for folder in segments)
    assert 1 <= finished < 3 and not out.exists()

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    # The killed driver's tasks are ended with it (a Ray job's workers die with its driver), so
    # what was finished at the kill is what the resumed render finds, and it renders the rest.
    assert f"resuming: {finished} of 3 segments are finished" in resumed.stderr
    assert_same_frames(decoded(out), reference)
    assert not parts_folder(out).exists()
    with av.open(str(out)) as container:
        assert len(container.streams.audio) == 1


@pytest.mark.parametrize(
    "input_, output, args, message",
    [
        ("-", "out.mp4", ["--segments", "2"], "standard input cannot be split into segments"),
        ("clip.mp4", "-", ["--segments", "2"], "--segments needs a file or folder output, not standard output"),
        ("clip.mp4", "out.mp4", ["--segments", "0"], "--segments 0: give 1 or more segments"),
        ("clip.mp4", "out.mp4", ["--segments", "-3"], "--segments -3: give 1 or more segments"),
        ("clip.mp4", "out.mp4", ["--ray", "auto"], "--ray and --gpus-per-segment apply only to segmented renders"),
        ("clip.mp4", "out.mp4", ["--segments", "2", "--gpus-per-segment", "-1"], "--gpus-per-segment -1: give 0 or more"),
        ("clip.mp4", "out.mp4", ["--segments", "2", "--save-every-loop"], "--save-every-loop is not made by segmented"),
        ("clip.mp4", "out.avi", ["--segments", "2"], "cannot tell the video format of output"),
        ("clip.mp4", "out.mp4", ["--segments", "2", "--ray", "127.0.0.1:1"], "cannot connect to Ray at '127.0.0.1:1'"),
    ],
)
def test_bad_segment_requests_are_one_line_and_leave_nothing(input_, output, args, message, tmp_path, capsys, monkeypatch):
    write_sample_clip(tmp_path / "clip.mp4", frames=4, fps=24, size=SIZE)
    monkeypatch.chdir(tmp_path)
    assert main(["render", input_, "-o", output, *args, "--model", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_without_ray_segments_say_how_to_install_it(tmp_path, capsys, monkeypatch):
    clip = write_sample_clip(tmp_path / "clip.mp4", frames=4, fps=24, size=SIZE)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when Ray is not installed
    assert main(["render", str(clip), "-o", str(tmp_path / "out.mp4"), "--model", "demo", "--segments", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--segments needs Ray" in err[0] and "pip install 'vlrt[ray]'" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_more_segments_than_frames_render_one_segment_per_frame(ray_cluster, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, picture in enumerate(sample_frames(4, SIZE)):
        av.VideoFrame.from_ndarray(picture, format="rgb24").to_image().save(frames / f"{i:04d}.png")
    base = ["--model", "demo", "--backend", "torch", "--loop-n", "2", "--steps", "2", "--denoising-strength", "0.5",
            "--temporal-superimpose-alpha-list", "0.2,0.6,0.2", "--max-batch", "1"]
    args = [*base, "--seed", "3"]
    with one_thread():
        assert main(["render", f"{frames}/", "-o", f"{tmp_path / 'one'}/", *args, "--quiet"]) == 0
    assert main(["render", f"{frames}/", "-o", f"{tmp_path / 'many'}/", *args, "--segments", "10",
                 "--gpus-per-segment", "0"]) == 0
    assert "the input has 4 frames: rendering 4 segments, not 10" in capsys.readouterr().err
    assert_same_frames(read_frames(tmp_path / "many"), read_frames(tmp_path / "one"))
    # Without --resume a segmented render redoes every frame, even where the folder holds frames already.
    before = read_frames(tmp_path / "many")
    assert main(["render", f"{frames}/", "-o", f"{tmp_path / 'many'}/", *base, "--seed", "4", "--segments", "2",
                 "--quiet"]) == 0
    assert all(not np.array_equal(a, b) for a, b in zip(read_frames(tmp_path / "many"), before))
    assert main(["render", f"{frames}/", "-o", f"{tmp_path / 'gpu'}/", *args, "--segments", "2",
                 "--gpus-per-segment", "1"]) == 2
    assert "--gpus-per-segment 1: the Ray cluster has 0 GPUs" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()


def test_onnx_engines_are_built_once_before_the_segments_and_only_loaded_by_them(ray_cluster, tmp_path, capsys):
    clip = write_sample_clip(tmp_path / "clip.mp4", frames=6, fps=24, size=SIZE)
    engines = tmp_path / "engines"
    args = [str(clip), "--model", "demo", "--backend", "ort", "--engines", str(engines), "--loop-n", "1",
            "--steps", "2", "--seed", "5", "--max-batch", "1"]
    assert main(["render", *args, "-o", f"{tmp_path / 'seg'}/", "--segments", "3"]) == 0
    err = capsys.readouterr().err
    built = [line for line in err.splitlines() if "building the" in line]
    assert sorted(line.split()[3] for line in built) == ["unet", "vae_decoder", "vae_encoder"], err
    assert len([p for p in engines.iterdir() if not p.name.startswith(".")]) == 3
    assert main(["render", *args, "-o", f"{tmp_path / 'one'}/", "--quiet"]) == 0
    assert_same_frames(read_frames(tmp_path / "seg"), read_frames(tmp_path / "one"))


def test_an_error_in_one_segment_stops_the_render_in_one_line_and_leaves_no_video(ray_cluster, clip, tmp_path, capsys):
    # Only the last segment (frames 20-29; the second one reads up to frame 28) reaches frame 29.
    out = tmp_path / "out.mp4"
    schedule = "0.5 if image_i < 30 else 'x'"
    assert main(["render", str(clip), "-o", str(out), *RENDER, "--segments", "3", "--denoising-schedule", schedule]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("vlrt: error: segment 3 (frames 20-29): ") and "denoising" in err[0]
    assert not out.exists()
    assert "complete = false" in (tmp_path / "out.mp4.settings.toml").read_text()


def test_segments_put_a_border_on_a_scene_cut_and_give_the_frames_of_one_render(ray_cluster, tmp_path, monkeypatch):
    """Shots of 21 and 9 frames: the planned border at 20 moves onto the cut at 21, where neither
    segment needs a halo (nothing crosses a cut); the frames are those of one render all the same."""
    source = write_frames(tmp_path / "in", shot_frames(0, 21, SIZE) + shot_frames(1, 9, SIZE))
    with one_thread():
        assert main(["render", str(source), "-o", f"{tmp_path / 'one'}/", *RENDER, "--quiet"]) == 0
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["render", str(source), "-o", f"{tmp_path / 'out'}/", *RENDER, "--segments", "3", "--ray", ray_cluster]) == 0
    assert_same_frames(read_frames(tmp_path / "out"), read_frames(tmp_path / "one"))
    assert "1 scene cut(s): 21" in terminal.text
    assert "3 segments of 9–11 frames with halos of 9 frames: 60% more frames" in terminal.text  # 9 + 9 + 0 halo frames
    assert tomllib.loads((tmp_path / "out" / "settings.toml").read_text())["vlrt"]["scene_cuts"] == [21]
