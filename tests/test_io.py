"""Sources, sinks and the sample clip: formats, pipes, exactness, crash safety, error lines."""

from __future__ import annotations

import io
import os
import queue
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vlrt.demo.clip import sample_frames, write_sample_clip
from vlrt.errors import OutputClosed, VlrtError
from vlrt.frames import Frame
from vlrt.io.images import natural_key
from vlrt.io.sinks import open_sink
from vlrt.io.sources import open_source
from vlrt.io.threads import BackgroundWorker, prefetch

SIZE = (64, 48)  # W, H
FPS = Fraction(24)


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    return sample_frames(12, SIZE)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=24, fps=24, size=SIZE)


def frames_of(pictures: list[np.ndarray]) -> list[Frame]:
    return [Frame(i, p, None, f"{i:06d}.png") for i, p in enumerate(pictures)]


def write_all(spec: str, pictures: list[np.ndarray], **kwargs) -> None:
    with open_sink(spec, fps=FPS, **kwargs) as sink:
        for frame in frames_of(pictures):
            sink.write(frame)


def feed_pipe(data: bytes, chunk: int = 1000) -> tuple[io.BufferedReader, threading.Thread]:
    """A real (unseekable) pipe carrying `data`, written in small pieces by a thread."""
    read_fd, write_fd = os.pipe()

    def produce() -> None:
        with os.fdopen(write_fd, "wb") as out:
            for start in range(0, len(data), chunk):
                out.write(data[start : start + chunk])
                out.flush()

    writer = threading.Thread(target=produce, daemon=True)
    writer.start()
    return os.fdopen(read_fd, "rb"), writer


def encode_bytes(pictures: list[np.ndarray], muxer: str, codec: str, pix_fmt: str) -> bytes:
    """A stream written with PyAV directly (independently of vlrt's sinks)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], pix_fmt
        for picture in pictures:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def probe(path: Path) -> dict:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = list(container.decode(video))
        audio = container.streams.audio
        return {
            "codec": video.codec_context.name,
            "pix_fmt": video.codec_context.pix_fmt,
            "size": (video.width, video.height),
            "rate": video.average_rate,
            "frames": len(frames),
            "video_s": float(frames[-1].time + 1 / video.average_rate),
            "colorspace": frames[0].colorspace,
            "audio": [(a.codec_context.name, float(a.duration * a.time_base) if a.duration else None) for a in audio],
        }


# --- sources -------------------------------------------------------------------------------


def test_natural_sort_key_orders_numbers_by_value():
    names = ["frame10.png", "frame2.png", "Frame1.png", "frame02.png", "a.png"]
    assert sorted(names, key=natural_key) == ["a.png", "Frame1.png", "frame02.png", "frame2.png", "frame10.png"]


def test_folder_natural_order_sniffing_subsampling_and_max_frames(tmp_path, pictures):
    for i in range(10):  # frame0 … frame9, one of them without a suffix
        name = "frame7" if i == 7 else f"frame{i}.png"
        Image.fromarray(pictures[i]).save(tmp_path / name, format="PNG")
    (tmp_path / ".frame99.png").write_bytes(b"hidden")
    (tmp_path / "frame3.txt").write_text("a prompt, not a frame")
    (tmp_path / "sub").mkdir()

    source = open_source(str(tmp_path), extract_nth_frame=3, max_frames=3)
    assert (source.info.kind, source.info.frame_count, source.info.fps, source.info.path) == ("folder", 3, None, None)
    frames = list(source)
    assert [f.name for f in frames] == ["frame0.png", "frame3.png", "frame6.png"]
    assert [f.index for f in frames] == [0, 1, 2]
    for frame, picture in zip(frames, [pictures[0], pictures[3], pictures[6]]):
        np.testing.assert_array_equal(frame.image, picture)

    every = [f.name for f in open_source(str(tmp_path), extract_nth_frame=3, is_continue=True)]
    assert every == [f"frame{i}.png" if i != 7 else "frame7" for i in range(10)]


def test_single_image_repeats_max_frames_times(tmp_path, pictures):
    path = tmp_path / "still.png"
    Image.fromarray(pictures[0]).save(path)
    source = open_source(str(path), max_frames=4, input_fps=Fraction(12))
    assert (source.info.kind, source.info.frame_count, source.info.fps) == ("image", 4, 12)
    frames = list(source)
    assert [f.name for f in frames] == ["000000.png", "000001.png", "000002.png", "000003.png"]
    frames[0].image[:] = 0  # each frame is its own copy
    np.testing.assert_array_equal(frames[3].image, pictures[0])


def test_rgba_and_palette_transparency_keep_alpha(tmp_path, pictures):
    alpha = np.tile(np.arange(SIZE[0], dtype=np.uint8) * 4, (SIZE[1], 1))
    Image.fromarray(np.dstack([pictures[0], alpha])).save(tmp_path / "0.png")
    palette = Image.new("P", (4, 2), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "1.png", transparency=0)

    first, second = list(open_source(str(tmp_path)))
    np.testing.assert_array_equal(first.image, pictures[0])
    np.testing.assert_array_equal(first.alpha, alpha)
    assert second.alpha is not None and second.alpha[0, 0] == 0 and second.alpha[1, 1] == 255
    assert tuple(second.image[1, 1]) == (255, 0, 0)


def test_video_file_frames_rate_count_and_subsampling(clip):
    source = open_source(str(clip), extract_nth_frame=5, max_frames=4)
    info = source.info
    assert (info.kind, info.width, info.height, info.fps, info.frame_count) == ("video", 64, 48, 24, 4)
    assert info.path == clip and info.has_audio
    frames = list(source)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert [round(f.meta["time"] * 24) for f in frames] == [0, 5, 10, 15]
    reference = sample_frames(24, SIZE)
    for frame, raw_index in zip(frames, [0, 5, 10, 15]):
        assert np.abs(frame.image.astype(int) - reference[raw_index]).mean() < 6  # lossy yuv420p


def test_display_rotation_is_applied(tmp_path):
    picture = np.zeros((48, 64, 3), np.uint8)
    picture[:8, :8] = 255  # a mark in the top-left corner of the stored picture
    path = tmp_path / "phone.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
        stream.set_display_rotation(90)  # shown turned a quarter counter-clockwise
        out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    source = open_source(str(path))
    assert (source.info.width, source.info.height) == (48, 64)
    [frame] = list(source)
    assert frame.image[60, 2].tolist() == [255, 255, 255] and frame.image[2, 2].tolist() == [0, 0, 0]


def test_rawvideo_from_stdin_pipe(pictures):
    data = b"".join(p.tobytes() for p in pictures[:7])
    stdin, writer = feed_pipe(data, chunk=777)  # pieces that do not align with frames
    source = open_source(
        "-", input_format="rawvideo", input_size=SIZE, input_fps=FPS, extract_nth_frame=2, stdin=stdin
    )
    assert (source.info.kind, source.info.fps, source.info.frame_count) == ("stdin", 24, None)
    frames = list(source)
    writer.join()
    assert [f.name for f in frames] == ["000000.png", "000001.png", "000002.png", "000003.png"]
    for frame, picture in zip(frames, pictures[0:7:2]):
        np.testing.assert_array_equal(frame.image, picture)


@pytest.mark.parametrize(("muxer", "codec", "pix_fmt"), [("nut", "rawvideo", "rgb24"), ("matroska", "ffv1", "bgr0")])
def test_container_from_unseekable_pipe(pictures, muxer, codec, pix_fmt):
    stdin, writer = feed_pipe(encode_bytes(pictures, muxer, codec, pix_fmt))
    source = open_source("-", stdin=stdin)
    assert (source.info.kind, source.info.width, source.info.height, source.info.fps) == ("stdin", 64, 48, 24)
    frames = list(source)
    writer.join()
    assert len(frames) == len(pictures)
    for frame, picture in zip(frames, pictures):
        np.testing.assert_array_equal(frame.image, picture)


def test_faststart_mp4_from_a_subprocess(clip):
    producer = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())", str(clip)],
        stdout=subprocess.PIPE,
    )
    frames = list(open_source("-", stdin=producer.stdout))
    assert producer.wait() == 0
    assert len(frames) == 24


@pytest.mark.parametrize(("output_format", "lag"), [("nut", 0), ("matroska", 1), ("rawvideo", 0)])
def test_pipe_frames_reach_the_reader_while_the_writer_runs(pictures, output_format, lag):
    """Lockstep: frame i must be decoded downstream before frame i+1+lag is written.

    A large probe on the reading side or a missing flush on the writing side would stall it.
    """
    read_fd, write_fd = os.pipe()
    received: queue.Queue = queue.Queue()
    raw = {"input_format": "rawvideo", "input_size": SIZE, "input_fps": FPS} if output_format == "rawvideo" else {}

    def consume() -> None:
        try:
            for frame in open_source("-", stdin=os.fdopen(read_fd, "rb"), **raw):
                received.put(frame)
        finally:
            received.put(None)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    stdout = os.fdopen(write_fd, "wb")
    sink = open_sink("-", fps=FPS, output_format=output_format, stdout=stdout)
    for i, picture in enumerate(pictures[:6]):
        sink.write(Frame(i, picture))
        if i >= lag:
            got = received.get(timeout=20)
            assert got is not None and got.index == i - lag
            np.testing.assert_array_equal(got.image, pictures[i - lag])
    sink.close()
    stdout.close()
    reader.join(timeout=20)
    rest = [received.get(timeout=5) for _ in range(lag + 1)]
    assert [f.index for f in rest[:-1]] == list(range(6 - lag, 6)) and rest[-1] is None


def test_redirected_file_on_stdin_may_be_a_plain_mp4(tmp_path, pictures):
    path = tmp_path / "plain.mp4"  # index at the end: only readable because stdin can seek
    path.write_bytes(encode_bytes(pictures[:4], "mp4", "libx264", "yuv420p"))
    with path.open("rb") as stdin:
        source = open_source("-", stdin=stdin)
        assert source.info.frame_count == 4
        assert len(list(source)) == 4


def test_plain_mp4_on_a_pipe_says_how_to_feed_it(tmp_path):
    """A normal mp4 (index after the pictures) larger than FFmpeg's read buffer: no "corrupt", but
    how to feed it; the same bytes redirected from the file (seekable) decode whole."""
    rng = np.random.default_rng(3)
    noise = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(12)]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for picture in noise:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    data = buffer.getvalue()
    assert len(data) > 6 * 32768 and data.index(b"mdat") < data.index(b"moov")  # past the 32 KiB read buffer
    stdin, writer = feed_pipe(data, chunk=65536)
    with pytest.raises(VlrtError) as caught:
        list(open_source("-", stdin=stdin))
    message = str(caught.value)
    assert "corrupt" not in message and "\n" not in message
    for words in ("plain mp4", "cannot stream", "< file.mp4", "-movflags +faststart", "-f nut"):
        assert words in message
    stdin.close()
    path = tmp_path / "plain.mp4"
    path.write_bytes(data)
    with path.open("rb") as redirected:
        assert len(list(open_source("-", stdin=redirected))) == 12


def test_terminal_on_stdin_is_refused():
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "rb", buffering=0) as tty, pytest.raises(VlrtError, match="terminal"):
            open_source("-", stdin=tty)
    finally:
        os.close(leader)


def test_source_close_stops_decoding_early(clip):
    source = open_source(str(clip))
    frames = iter(source)
    assert next(frames).index == 0
    source.close()
    assert list(frames) == []  # what was prefetched is dropped
    with pytest.raises(RuntimeError):
        iter(source)


# --- sinks ---------------------------------------------------------------------------------


def test_png_folder_output_is_bit_exact_and_keeps_alpha(tmp_path, pictures):
    out = tmp_path / "frames"
    alpha = np.full(SIZE[::-1], 128, np.uint8)
    with open_sink(f"{out}/", fps=FPS) as sink:
        sink.write(Frame(0, pictures[0]))
        sink.write(Frame(1, pictures[1], alpha))
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png"]
    first, second = list(open_source(str(out)))
    np.testing.assert_array_equal(first.image, pictures[0])
    assert first.alpha is None
    np.testing.assert_array_equal(second.image, pictures[1])
    np.testing.assert_array_equal(second.alpha, alpha)


def test_png_write_failure_leaves_no_partial_file(tmp_path, pictures, monkeypatch):
    def fail_midway(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail_midway)
    sink = open_sink(f"{tmp_path}/", fps=FPS)
    sink.write(Frame(0, pictures[0]))
    with pytest.raises(VlrtError, match="writing frame 0 to the output failed: disk full"):
        sink.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("name", "codec"), [("out.mp4", "h264"), ("out.mkv", "ffv1"), ("out.webm", "vp9")])
def test_lossless_video_round_trip_is_bit_exact(tmp_path, pictures, name, codec):
    noisy = np.random.default_rng(3).integers(0, 256, (*SIZE[::-1], 3), dtype=np.uint8)
    written = [*pictures[:5], noisy]
    path = tmp_path / name
    write_all(str(path), written, lossless=True)
    assert probe(path)["codec"] == codec
    frames = list(open_source(str(path)))
    assert len(frames) == len(written)
    for frame, picture in zip(frames, written):
        np.testing.assert_array_equal(frame.image, picture)


@pytest.mark.parametrize("spec", ["out.mkv", "-"])
def test_alpha_survives_lossless_mkv_and_nut_pipe(tmp_path, pictures, spec):
    alpha = np.tile(np.arange(SIZE[1], dtype=np.uint8)[:, None] * 5, (1, SIZE[0]))
    frames = [Frame(i, p, alpha) for i, p in enumerate(pictures[:3])]
    if spec == "-":
        stdout = io.BytesIO()
        with open_sink("-", fps=FPS, stdout=stdout) as sink:
            for frame in frames:
                sink.write(frame)
        stdin, writer = feed_pipe(stdout.getvalue())
        decoded = list(open_source("-", stdin=stdin))
        writer.join()
    else:
        with open_sink(str(tmp_path / spec), fps=FPS, lossless=True) as sink:
            for frame in frames:
                sink.write(frame)
        decoded = list(open_source(str(tmp_path / spec)))
    assert len(decoded) == 3
    for got, sent in zip(decoded, frames):
        np.testing.assert_array_equal(got.image, sent.image)
        np.testing.assert_array_equal(got.alpha, alpha)


def test_default_mp4_is_h264_yuv420p_with_right_count_and_rate(tmp_path, pictures):
    path = tmp_path / "out.mp4"
    write_all(str(path), pictures, crf=17)
    info = probe(path)
    assert (info["codec"], info["pix_fmt"], info["size"], info["frames"], info["rate"]) == (
        "h264", "yuv420p", (64, 48), len(pictures), 24,
    )
    assert info["colorspace"] == 1  # tagged BT.709, as it was converted
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: plays while downloading
    decoded = [f.image for f in open_source(str(path))]
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(decoded, pictures)) < 6


def test_odd_size_is_padded_to_even_for_yuv420p(tmp_path, pictures):
    odd = [p[:47, :63] for p in pictures[:3]]
    path = tmp_path / "odd.mp4"
    write_all(str(path), odd)
    assert probe(path)["size"] == (64, 48)
    decoded = [f.image for f in open_source(str(path))]
    assert np.abs(decoded[0][:47, :63].astype(int) - odd[0]).mean() < 6
    np.testing.assert_allclose(decoded[0][47].astype(int), decoded[0][46].astype(int), atol=40)


@pytest.mark.parametrize(("name", "audio_codec"), [("with_sound.mp4", "aac"), ("with_sound.webm", "opus")])
def test_audio_is_carried_and_cut_to_the_video(tmp_path, pictures, clip, name, audio_codec):
    path = tmp_path / name
    write_all(str(path), pictures[:10], audio_from=clip)  # 10 of the clip's 24 frames
    info = probe(path)
    assert info["video_s"] == pytest.approx(10 / 24)
    [(codec, _)] = info["audio"]
    assert codec == audio_codec
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.pts is not None]
        start = float(packets[0].pts * stream.time_base)
        end = float((packets[-1].pts + packets[-1].duration) * stream.time_base)
    assert abs(start) < 0.03
    assert end == pytest.approx(10 / 24, abs=0.03)  # within one audio packet


def test_output_appears_only_when_closed_and_abort_removes_it(tmp_path, pictures):
    path = tmp_path / "out.mp4"
    sink = open_sink(str(path), fps=FPS)
    for frame in frames_of(pictures[:4]):
        sink.write(frame)
    assert not path.exists()
    sink.abort()
    assert not path.exists() and os.listdir(tmp_path) == []

    with pytest.raises(KeyError):
        with open_sink(str(path), fps=FPS) as sink:
            sink.write(Frame(0, pictures[0]))
            raise KeyError("the render failed")
    assert os.listdir(tmp_path) == []

    write_all(str(path), pictures[:4])
    assert os.listdir(tmp_path) == ["out.mp4"] and probe(path)["frames"] == 4


def test_encoder_error_reaches_the_writer_and_leaves_nothing(tmp_path, pictures):
    path = tmp_path / "out.mkv"
    sink = open_sink(str(path), fps=FPS)
    sink.write(Frame(0, pictures[0]))
    with pytest.raises(ValueError, match="frame 1 is 32x48"):
        sink.write(Frame(1, pictures[1][:, :32]))
        sink.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("output_format", ["nut", "rawvideo"])
def test_closed_stdout_pipe_raises_output_closed(pictures, output_format):
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with os.fdopen(write_fd, "wb", buffering=0) as stdout:  # unbuffered: nothing left to flush at exit
        sink = open_sink("-", fps=FPS, output_format=output_format, stdout=stdout)
        with pytest.raises(OutputClosed, match="output pipe closed by the reader"):
            for i in range(40):
                sink.write(Frame(i, pictures[i % len(pictures)]))
            sink.close()
        sink.abort()


# --- errors --------------------------------------------------------------------------------


def _video_without_frames(path: Path) -> Path:
    with av.open(str(path), "w", format="yuv4mpegpipe") as out:
        stream = out.add_stream("rawvideo", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        out.start_encoding()
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=48000, layout="mono")
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate, samples.pts = 48000, 0
        out.mux(stream.encode(samples))
        out.mux(stream.encode(None))
    return path


def _folder_with_corrupt_frame(folder: Path) -> Path:
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "0001.png")
    (folder / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


def _folder_without_images(folder: Path) -> Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("no frames here")
    return folder


def _image(path: Path) -> Path:
    Image.new("RGB", (8, 8)).save(path)
    return path


@pytest.mark.parametrize(
    ("make", "kwargs", "named", "says"),
    [
        (lambda d: d / "missing.mp4", {}, "missing.mp4", "does not exist"),
        (lambda d: _folder_without_images(d / "empty"), {}, "empty", "holds no images"),
        (lambda d: _folder_with_corrupt_frame(d / "frames"), {}, "0002.png", "cannot be read"),
        (lambda d: (d / "junk.mp4").write_bytes(os.urandom(4000)) and d / "junk.mp4", {}, "junk.mp4", "cannot be read"),
        (lambda d: _audio_only(d / "sound.m4a"), {}, "sound.m4a", "no video stream"),
        (lambda d: _video_without_frames(d / "empty.y4m"), {}, "empty.y4m", "zero frames"),
        (lambda d: _image(d / "still.png"), {}, "still.png", "max_frames"),
        (
            lambda d: (d / "raw.rgb").write_bytes(b"x" * 1000) and d / "raw.rgb",
            {"input_format": "rawvideo", "input_size": (8, 8)},
            "raw.rgb",
            "not a whole number",
        ),
    ],
)
def test_bad_inputs_give_one_line_naming_the_file(tmp_path, make, kwargs, named, says):
    path = make(tmp_path)
    with pytest.raises(VlrtError) as caught:
        source = open_source(str(path), **kwargs)
        list(source)
    message = str(caught.value)
    assert named in message and says in message and "\n" not in message


def test_bad_raw_stdin_is_reported(pictures):
    stdin, writer = feed_pipe(pictures[0].tobytes() + b"short")
    source = open_source("-", input_format="rawvideo", input_size=SIZE, stdin=stdin)
    with pytest.raises(VlrtError, match="standard input ended inside frame 1"):
        list(source)
    writer.join()
    with pytest.raises(VlrtError, match="input-size"):
        open_source("-", input_format="rawvideo", stdin=io.BytesIO(b""))
    with pytest.raises(VlrtError, match="unknown input format 'flv2'"):
        open_source("-", input_format="flv2", stdin=io.BytesIO(b""))


def test_bad_outputs_are_reported_before_rendering(tmp_path):
    with pytest.raises(VlrtError, match=r"out\.avi"):
        open_sink(str(tmp_path / "out.avi"), fps=FPS)
    with pytest.raises(VlrtError, match="nosuchcodec"):
        open_sink(str(tmp_path / "out.mp4"), fps=FPS, codec="nosuchcodec")
    with pytest.raises(VlrtError, match="'gif'"):
        open_sink("-", fps=FPS, output_format="gif")


# --- threads and the sample clip -----------------------------------------------------------


def test_prefetch_reraises_the_worker_error_after_the_items_before_it():
    def produce():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(produce(), 1):
            got.append(item)
    assert got == [1, 2]


def test_background_worker_reports_failure_on_next_submit():
    seen = []

    def consume(item: int) -> None:
        if item == 2:
            raise RuntimeError("encoder died")
        seen.append(item)

    worker = BackgroundWorker(consume, 1)
    with pytest.raises(RuntimeError, match="encoder died"):
        for i in range(50):
            worker.submit(i)
        worker.finish()
    assert seen == [0, 1]


def test_sample_clip_is_deterministic_h264_with_sound(tmp_path):
    np.testing.assert_array_equal(sample_frames(3, (32, 16))[2], sample_frames(10, (32, 16))[2])  # a prefix
    assert not np.array_equal(sample_frames(3, (32, 16))[0], sample_frames(3, (32, 16))[1])  # it moves
    path = write_sample_clip(tmp_path / "demo.mp4", frames=12, fps=12, size=(32, 16))
    info = probe(path)
    assert (info["codec"], info["pix_fmt"], info["frames"], info["rate"]) == ("h264", "yuv420p", 12, 12)
    [(codec, seconds)] = info["audio"]
    assert codec == "aac" and seconds == pytest.approx(1.0, abs=0.05)
