"""The input files people have (issue 20, part 2): each made in the test with PyAV, rendered or read
as a user would, and checked for what the user expects."""

from __future__ import annotations

import logging
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vlrt.cli import main
from vlrt.io.sources import open_source


def moving_frames(count: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """A bright bar sliding over a gradient: every frame differs."""
    w, h = size
    frames = []
    for i in range(count):
        picture = np.zeros((h, w, 3), np.uint8)
        picture[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
        picture[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
        x = (i * 3) % (w - 8)
        picture[:, x : x + 8] = 255
        frames.append(picture)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int = 24, *, codec: str = "libx264",
                audio_seconds: float | None = None, audio_codec: str = "aac", audio_format: str = "fltp",
                tones: tuple[float, ...] = (440,), languages: tuple[str, ...] = (), default: int = 0) -> Path:
    """A video and, with `audio_seconds`, one audio track per tone (languages, default track as
    given), written with PyAV directly, interleaved by time."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        tracks = []
        for number, frequency in enumerate(tones if audio_seconds is not None else ()):
            audio = out.add_stream(audio_codec, rate=48000)
            audio.layout, audio.format = "mono", audio_format
            if languages:
                audio.metadata["language"] = languages[number]
            audio.disposition = av.stream.Disposition.default if number == default else 0
            tone = np.sin(2 * np.pi * frequency * np.arange(int(48000 * audio_seconds)) / 48000)
            tracks.append((audio, tone))
        chunk = 1024
        sent = 0

        def send_until(end: int) -> None:
            nonlocal sent
            while sent < end:
                for audio, tone in tracks:
                    if sent < len(tone):
                        out.mux(audio.encode(_audio_frame(tone[sent : sent + chunk], sent, audio_format)))
                sent += chunk

        longest = max((len(tone) for _, tone in tracks), default=0)
        for i, picture in enumerate(frames):
            out.mux(video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
            send_until(min(longest, int(48000 * (i + 1) / fps)))
        out.mux(video.encode(None))
        send_until(longest)
        for audio, _ in tracks:
            out.mux(audio.encode(None))
    return path


def _audio_frame(samples: np.ndarray, start: int, audio_format: str) -> av.AudioFrame:
    if audio_format.startswith("s32"):
        data = (samples * 0.5 * 2**31).astype(np.int32)
    elif audio_format.startswith("s16"):
        data = (samples * 0.5 * 2**15).astype(np.int16)
    else:
        data = (samples * 0.5).astype(np.float32)
    frame = av.AudioFrame.from_ndarray(data[None, :], format=audio_format, layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
    return frame


def decoded_count(path: Path) -> int:
    """Frames PyAV itself decodes from `path` (independently of vlrt's reader)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def render(capsys, *args: str) -> tuple[int, str]:
    code = main(["render", "--model", "demo", "--backend", "torch", "--loop-n", "1", "--steps", "2", "--denoising-strength", "0.5", *args])
    return code, capsys.readouterr().err


# 2.11 -------------------------------------------------------------------------------------------


def test_truncated_mkv_renders_what_is_there_and_warns_with_the_numbers(tmp_path, capsys, caplog):
    whole = write_video(tmp_path / "whole.mkv", moving_frames(48, (32, 32)), audio_seconds=2.0)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    there = decoded_count(cut)
    assert 3 < there < 40
    with caplog.at_level(logging.WARNING, logger="vlrt"):
        code, err = render(capsys, str(cut), "-o", str(tmp_path / "out") + "/")
    assert code == 0, err
    # The header says 2.04 s (the sound's encoder delay included): 49 frames at 24 fps.
    assert f"announced 49 frames (2.04 s) but only {there} could be decoded ({there / 24:.2f} s)" in caplog.text
    assert len(list((tmp_path / "out").glob("*.png"))) == there  # the frames are kept


def test_complete_files_do_not_warn_even_with_a_longer_sound_track(tmp_path, caplog):
    path = write_video(tmp_path / "long_sound.mkv", moving_frames(24, (32, 32)), audio_seconds=1.3)
    with caplog.at_level(logging.WARNING), open_source(str(path)) as source:
        assert sum(1 for _ in source) == 24
    assert "truncated" not in caplog.text


# 2.7 --------------------------------------------------------------------------------------------


def _tone_check(samples: np.ndarray, rate: int) -> None:
    """The 440 Hz tone at half scale, as written: not the full-scale noise of a misread codec."""
    steady = samples[rate // 10 : rate // 10 + rate // 2]
    assert np.sqrt(np.mean(steady**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)
    spectrum = np.abs(np.fft.rfft(steady))
    assert np.fft.rfftfreq(len(steady), 1 / rate)[np.argmax(spectrum)] == pytest.approx(440, abs=5)


@pytest.mark.parametrize(("name", "expected"), [("out.mp4", "aac"), ("out.mov", "aac"), ("out.mkv", "pcm_s24le")])
def test_24_bit_pcm_is_re_encoded_where_players_would_not_decode_it(tmp_path, capsys, name, expected):
    source = write_video(tmp_path / "camera.mkv", moving_frames(24, (32, 32)), audio_seconds=1.0,
                         audio_codec="pcm_s24le", audio_format="s32")
    out = tmp_path / name
    code, err = render(capsys, str(source), "-o", str(out))
    assert code == 0, err
    with av.open(str(out)) as container:
        (audio,) = container.streams.audio
        assert audio.codec_context.name == expected
        rate = audio.codec_context.sample_rate
        samples = np.concatenate([f.to_ndarray().astype(np.float64).reshape(-1) for f in container.decode(audio)])
    if expected == "pcm_s24le":
        samples = samples / 2**31
    _tone_check(samples, rate)
    if shutil.which("ffmpeg") is not None:  # a second decoder: Debian's ffmpeg
        pcm = subprocess.run(["ffmpeg", "-v", "error", "-i", str(out), "-map", "0:a", "-f", "f32le", "-ac", "1", "-"],
                             check=True, capture_output=True).stdout
        _tone_check(np.frombuffer(pcm, np.float32).astype(np.float64), rate)


# 2.5 --------------------------------------------------------------------------------------------


def _flat_frames(count: int) -> list[np.ndarray]:
    """Frames of few colours (a GIF palette holds them exactly)."""
    frames = []
    for i in range(count):
        picture = np.zeros((24, 32, 3), np.uint8)
        picture[:, : 4 * (i + 1)] = (200, 40 * i, 30)
        frames.append(picture)
    return frames


@pytest.mark.parametrize(("suffix", "durations_ms"), [
    (".gif", [40] * 6),
    (".png", [100, 50, 50, 100, 20, 80]),  # APNG
    (".webp", [40] * 6),
])
def test_animated_pictures_are_videos_with_their_durations(tmp_path, suffix, durations_ms):
    from PIL import Image

    pictures = _flat_frames(6)
    path = tmp_path / f"anim{suffix}"
    images = [Image.fromarray(p) for p in pictures]
    extra = {"lossless": True} if suffix == ".webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations_ms, loop=0, **extra)
    with open_source(str(path)) as source:
        frames = list(source)
        info = source.info
    assert info.frame_count == 6 and len(frames) == 6
    assert info.fps == (Fraction(1000, durations_ms[0]) if len(set(durations_ms)) == 1 else Fraction(6000, sum(durations_ms)))
    assert [f.meta["time"] for f in frames] == pytest.approx([sum(durations_ms[:i]) / 1000 for i in range(6)])
    for frame, picture in zip(frames, pictures):
        np.testing.assert_array_equal(frame.image, picture)


def test_animated_gif_renders_to_a_video_of_its_frames_and_rate(tmp_path, capsys):
    from PIL import Image

    images = [Image.fromarray(p) for p in _flat_frames(6)]
    gif = tmp_path / "meme.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=40, loop=0)
    code, err = render(capsys, str(gif), "-o", str(tmp_path / "out.mp4"))
    assert code == 0, err
    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.video[0]
        assert (sum(1 for _ in container.decode(stream)), stream.average_rate) == (6, 25)


# 2.3 --------------------------------------------------------------------------------------------


def _disc_extent(picture: np.ndarray) -> tuple[int, int]:
    """Width and height of the bright disc."""
    ys, xs = np.nonzero(picture.mean(axis=2) > 128)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def test_anamorphic_video_is_rendered_at_its_display_aspect(tmp_path, capsys):
    """Stored 96×72 with pixels 4:3 wide (displayed 128×72, 16:9): a disc drawn round on the
    display is stored as an ellipse, and must come out round in square pixels."""
    stored_w, h, sar, radius = 96, 72, Fraction(4, 3), 24
    ys, xs = np.mgrid[0:h, 0:stored_w]
    disc = ((xs + 0.5 - stored_w / 2) * sar) ** 2 + (ys + 0.5 - h / 2) ** 2 <= radius**2
    picture = np.where(disc[..., None], 230, 20).astype(np.uint8).repeat(3, axis=2)
    path = tmp_path / "anamorphic.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = stored_w, h, "yuv444p"
        stream.codec_context.sample_aspect_ratio = sar
        for _ in range(3):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    with av.open(str(path)) as check:
        assert check.streams.video[0].sample_aspect_ratio == sar  # the file really is anamorphic
    with open_source(str(path)) as source:
        assert (source.info.width, source.info.height) == (128, 72)
        w, hh = _disc_extent(next(iter(source)).image)
        assert abs(w - hh) <= 2 and abs(w - 2 * radius) <= 3
    code, err = render(capsys, str(path), "-o", str(tmp_path / "out.mp4"), "--denoising-strength", "0.2")
    assert code == 0, err
    with av.open(str(tmp_path / "out.mp4")) as rendered:
        stream = rendered.streams.video[0]
        assert (stream.width, stream.height) == (128, 72)
        assert stream.sample_aspect_ratio in (None, 1)
        w, hh = _disc_extent(next(rendered.decode(stream)).to_ndarray(format="rgb24"))
        assert abs(w - hh) <= 3


# 2.6 --------------------------------------------------------------------------------------------


def _woven(i: int, w: int = 64, h: int = 48) -> np.ndarray:
    """An interlaced camera's frame of a moving bar: the bottom field is taken half a frame after
    the top one, so the bar's edges comb."""
    picture = np.full((h, w, 3), 30, np.uint8)
    x = (i * 6) % (w - 16)
    picture[0::2, x : x + 10] = 230
    picture[1::2, x + 3 : x + 13] = 230
    return picture


def _combing(picture: np.ndarray) -> float:
    """Mean distance of each row from the mean of its neighbours: high where fields disagree."""
    grey = picture.astype(float).mean(axis=2)
    return float(np.abs(grey[1:-1] - (grey[:-2] + grey[2:]) / 2).mean())


def _interlaced_clip(path: Path, frames: int = 8) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"qp": "0", "x264-params": "interlaced=1:tff=1"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        for i in range(frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(_woven(i), format="rgb24")))
        out.mux(stream.encode(None))
    return path


def test_interlaced_video_is_deinterlaced_unless_asked_not_to(tmp_path, caplog, capsys):
    path = _interlaced_clip(tmp_path / "tape.mkv")
    with av.open(str(path)) as check:
        assert all(f.interlaced_frame for f in check.decode(video=0))  # the file is flagged interlaced
    with caplog.at_level(logging.INFO, logger="vlrt"), open_source(str(path)) as source:
        frames = [f.image for f in source]
    assert caplog.text.count("is interlaced: deinterlacing") == 1
    kept = [f.image for f in open_source(str(path), deinterlace=False)]
    assert len(frames) == len(kept) == 8
    assert min(_combing(k) for k in kept) > 10  # the fields comb as they came
    assert max(_combing(f) for f in frames) < 2
    # A start later in the file (--resume, --segments) gives the same pictures as decoding from the start.
    later = [f.image for f in open_source(str(path), start=5)]
    for got, whole in zip(later, frames[5:], strict=True):
        np.testing.assert_array_equal(got, whole)
    code, err = render(capsys, str(path), "-o", str(tmp_path / "out") + "/", "--denoising-strength", "0.1")
    assert code == 0, err
    code, err = render(capsys, str(path), "-o", str(tmp_path / "fields") + "/", "--denoising-strength", "0.1",
                       "--deinterlace", "off")
    assert code == 0, err
    from conftest import read_frames

    assert max(_combing(f) for f in read_frames(tmp_path / "out")) < 3
    assert min(_combing(f) for f in read_frames(tmp_path / "fields")) > 5


# 2.13 -------------------------------------------------------------------------------------------


def _tone_of(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("name", ["out.mkv", "out.mp4"])
def test_every_audio_track_is_carried_with_its_language_and_default_flag(tmp_path, capsys, name):
    source = write_video(tmp_path / "dub.mkv", moving_frames(24, (32, 32)), audio_seconds=1.0,
                         tones=(440, 880, 660), languages=("eng", "fra", "deu"), default=1)
    code, err = render(capsys, str(source), "-o", str(tmp_path / name))
    assert code == 0, err
    with av.open(str(tmp_path / name)) as container:
        tracks = [(s.language, bool(s.disposition & av.stream.Disposition.default)) for s in container.streams.audio]
        tones = []
        for stream in container.streams.audio:
            with av.open(str(tmp_path / name)) as again:
                track = again.streams.audio[stream.index - 1]
                samples = np.concatenate([f.to_ndarray().reshape(-1) for f in again.decode(track)])
                tones.append(round(_tone_of(samples.astype(float), track.codec_context.sample_rate)))
    assert tracks == [("eng", False), ("fra", True), ("deu", False)]
    assert tones == [440, 880, 660]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs Debian's ffmpeg to write a subtitle track")
def test_a_subtitle_track_left_out_is_named(tmp_path, capsys, caplog):
    (tmp_path / "subs.srt").write_text("1\n00:00:00,000 --> 00:00:00,500\nhello\n", encoding="utf-8")
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=32x32:rate=24", "-f", "lavfi",
                    "-i", "sine=r=48000", "-i", "subs.srt", "-t", "0.5", "-map", "0", "-map", "1", "-map", "2",
                    "-metadata:s:s:0", "language=spa", "-c:v", "libx264", "-c:a", "aac", "-c:s", "srt", "film.mkv"],
                   cwd=tmp_path, check=True)
    with caplog.at_level(logging.WARNING, logger="vlrt"):
        code, err = render(capsys, str(tmp_path / "film.mkv"), "-o", str(tmp_path / "out.mp4"))
    assert code == 0, err
    assert "not carried into the output: #2 subtitle srt spa" in caplog.text


# 2.2 --------------------------------------------------------------------------------------------


def _vfr_clip(path: Path) -> tuple[list[Fraction], int]:
    """A phone-like clip: 12 frames 1/15 s apart, then 12 frames 1/30 s apart; frame 12 flashes
    white and a 1 kHz beep starts at its time in the sound. Returns the frame times and the flash."""
    tb = Fraction(1, 90000)
    times = [Fraction(i, 15) if i <= 12 else Fraction(12, 15) + Fraction(i - 12, 30) for i in range(24)]
    flash = 12
    rate = 48000
    sound = np.zeros(int(rate * (times[-1] + Fraction(1, 30))), np.float32)
    onset = int(times[flash] * rate)
    sound[onset : onset + rate // 10] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(rate // 10) / rate)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        video.time_base = video.codec_context.time_base = tb
        audio = out.add_stream("aac", rate=rate)
        audio.layout, audio.format = "mono", "fltp"
        sent = 0
        for i, (time, picture) in enumerate(zip(times, moving_frames(24, (32, 32)))):
            if i == flash:
                picture = np.full_like(picture, 255)
            frame = av.VideoFrame.from_ndarray(picture // (1 if i == flash else 3), format="rgb24")
            frame.pts, frame.time_base = round(time / tb), tb
            out.mux(video.encode(frame))
            while sent < min(len(sound), int((time + Fraction(1, 15)) * rate)):
                out.mux(audio.encode(_audio_frame(sound[sent : sent + 1024] * 2, sent, "fltp")))
                sent += 1024
        out.mux(video.encode(None))
        while sent < len(sound):
            out.mux(audio.encode(_audio_frame(sound[sent : sent + 1024] * 2, sent, "fltp")))
            sent += 1024
        out.mux(audio.encode(None))
    return times, flash


def test_variable_frame_rate_keeps_each_frames_time_and_the_sound_in_sync(tmp_path, capsys):
    times, flash = _vfr_clip(tmp_path / "phone.mp4")
    out = tmp_path / "out.mp4"
    code, err = render(capsys, str(tmp_path / "phone.mp4"), "-o", str(out), "--denoising-strength", "0.2")
    assert code == 0, err
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        shown = [(f.time, f.to_ndarray(format="rgb24").mean()) for f in container.decode(video)]
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        chunks = [(f.time, f.to_ndarray()[0]) for f in container.decode(audio)]
        rate = audio.codec_context.sample_rate
    frame = 1 / 30
    assert [t for t, _ in shown] == pytest.approx([float(t) for t in times], abs=0.002)
    brightest = max(shown, key=lambda s: s[1])[0]
    beep = next(start + np.argmax(np.abs(samples) > 0.2) / rate for start, samples in chunks if np.abs(samples).max() > 0.2)
    assert abs(beep - brightest) < frame  # the picture and the sound of the flash together
    video_end = shown[-1][0] + frame
    audio_end = chunks[-1][0] + len(chunks[-1][1]) / rate
    assert abs(video_end - audio_end) < frame


def test_output_frame_rate_gives_a_constant_rate_for_a_variable_source(tmp_path, capsys):
    _vfr_clip(tmp_path / "phone.mp4")
    out = tmp_path / "out.mp4"
    code, err = render(capsys, str(tmp_path / "phone.mp4"), "-o", str(out), "--output-frame-rate", "20")
    assert code == 0, err
    with av.open(str(out)) as container:
        stamps = [f.time for f in container.decode(video=0)]
    assert stamps == pytest.approx([i / 20 for i in range(24)], abs=0.002)


def test_animation_of_unequal_durations_keeps_them_in_a_video_output(tmp_path, capsys):
    from PIL import Image

    durations = [100, 50, 50, 200, 20, 80]
    images = [Image.fromarray(p) for p in _flat_frames(6)]
    images[0].save(tmp_path / "anim.png", save_all=True, append_images=images[1:], duration=durations, loop=0)
    code, err = render(capsys, str(tmp_path / "anim.png"), "-o", str(tmp_path / "out.mkv"))
    assert code == 0, err
    with av.open(str(tmp_path / "out.mkv")) as container:
        stamps = [f.time for f in container.decode(video=0)]
    assert stamps == pytest.approx([sum(durations[:i]) / 1000 for i in range(6)], abs=0.002)


# 2.8 --------------------------------------------------------------------------------------------

# BT.709 linear RGB to BT.2020 linear RGB (ITU-R BT.2087, 2.2).
_709_TO_2020 = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]])


def _pq_signal(nits: np.ndarray) -> np.ndarray:
    """SMPTE ST 2084 inverse EOTF: cd/m² to the PQ signal 0..1."""
    m1, m2 = 2610 / 16384, 2523 / 4096 * 128
    c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    y = np.clip(nits / 10000, 0, 1) ** m1
    return ((c1 + c2 * y) / (1 + c3 * y)) ** m2


def _hlg_signal_of_grey(nits: np.ndarray) -> np.ndarray:
    """BT.2100 HLG signal of an achromatic display light on a 1000 cd/m² display (system gamma 1.2)."""
    scene = (nits / 1000) ** (1 / 1.2)
    a = 0.17883277
    b, c = 1 - 4 * a, 0.5 - a * np.log(4 * a)
    return np.where(scene <= 1 / 12, np.sqrt(3 * scene), a * np.log(np.maximum(12 * scene - b, 1e-9)) + c)


def _hdr_clip(path: Path, transfer: int, light_709: np.ndarray) -> Path:
    """Two 10-bit 4:4:4 frames of display light `light_709` (cd/m², BT.709 primaries), coded in BT.2020."""
    if transfer == 16:
        signal = _pq_signal(light_709 @ _709_TO_2020.T)
    else:
        signal = _hlg_signal_of_grey(light_709)  # grey patches only: R = G = B
    picture = av.VideoFrame.from_ndarray(np.round(signal * 65535).astype(np.uint16), format="rgb48le")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx265", rate=24, options={"x265-params": "lossless=1:log-level=error"})
        stream.width, stream.height, stream.pix_fmt = light_709.shape[1], light_709.shape[0], "yuv444p10le"
        context = stream.codec_context
        context.color_primaries, context.color_trc, context.colorspace, context.color_range = 9, transfer, 9, 1
        for i in range(2):
            coded = picture.reformat(format="yuv444p10le", dst_colorspace="BT2020", dst_color_range="MPEG")
            coded.pts, coded.color_primaries, coded.color_trc, coded.colorspace = i, 9, transfer, 9
            out.mux(stream.encode(coded))
        out.mux(stream.encode(None))
    return path


def _sdr(relative: float) -> float:
    """8-bit BT.709 SDR of light `relative` to reference white, below the tone curve's knee: gamma 2.4 (BT.1886)."""
    return 255 * relative ** (1 / 2.4)


@pytest.mark.parametrize("transfer", [16, 18], ids=["PQ", "HLG"])
def test_hdr_is_tone_mapped_to_bt709_sdr_and_says_so(tmp_path, caplog, transfer):
    patches = [5.0, 20.0, 40.0, 203.0, 1000.0]  # cd/m²; 203 is HDR reference white (BT.2408)
    light = np.zeros((16, 16 * len(patches), 3))
    for i, nits in enumerate(patches):
        light[:, 16 * i : 16 * (i + 1)] = nits
    if transfer == 16:
        light = np.concatenate([light, np.zeros((16, light.shape[1], 3))])
        light[16:, :16] = (40.0, 0, 0)  # a BT.709 red
    path = _hdr_clip(tmp_path / "hdr.mkv", transfer, light)
    with caplog.at_level(logging.INFO, logger="vlrt"), open_source(str(path)) as source:
        picture = next(iter(source)).image.astype(float)
    assert "tone-mapped to BT.709 SDR" in caplog.text and ("PQ" if transfer == 16 else "HLG") in caplog.text
    grey = [picture[4:12, 16 * i + 4 : 16 * i + 12].mean(axis=(0, 1)) for i in range(len(patches))]
    for value in grey:
        assert np.ptp(value) <= 2  # grey stays grey
    for nits, value in zip(patches[:3], grey[:3]):  # below the knee the curve is linear: gamma 2.4 only
        assert value.mean() == pytest.approx(_sdr(nits / 203), abs=3)
    assert grey[2].mean() < grey[3].mean() < grey[4].mean() and grey[4].mean() >= 250
    if transfer == 16:
        red = picture[20:28, 4:12].mean(axis=(0, 1))
        assert red[0] == pytest.approx(_sdr(40 / 203), abs=4) and red[1] < 6 and red[2] < 6


# 2.4 --------------------------------------------------------------------------------------------


def test_memory_estimate_counts_ort_attention_over_the_demo_vaes_positions(demo_model):
    """The demo VAE (scale factor 2) attends over every latent position in its middle block: at
    320×180, 160×90 = 14400 positions, 14400² scores and their softmax per row, 4 bytes each."""
    from vlrt.render.memory import estimate_bytes

    weights = sum(p.numel() for m in (demo_model.unet, demo_model.vae, demo_model.text_encoder) for p in m.parameters()) * 4
    assert estimate_bytes(demo_model, 320, 180, 8, "ort", 4) == weights + 8 * 14400**2 * 4 * 2
    assert estimate_bytes(demo_model, 320, 180, 8, "torch", 4) < 1024**3  # blockwise attention: no N² scores


def test_a_size_the_memory_cannot_hold_is_refused_with_one_that_fits(demo_model):
    from vlrt.errors import VlrtError
    from vlrt.render.memory import fit_render_size

    common = dict(rows=8, backend="ort", precision="fp32", device=torch.device("cpu"), log=print)
    available = 1024**3  # less than one row of 320×180 needs (14400² scores and softmax: 1.7 GB)
    with pytest.raises(VlrtError) as refused:
        fit_render_size(demo_model, 320, 180, sized_by_user=True, available=available, **common)
    message = str(refused.value)
    assert "rendering 320×180" in message and "1.0 GB are available" in message
    w, h = (int(v) for v in message.split("render at most ")[1].split(" ")[0].split("×"))
    assert w < 320 and h < 180 and abs(w / h - 16 / 9) < 0.1
    assert fit_render_size(demo_model, w, h, sized_by_user=True, available=available, **common) == (w, h)
    with pytest.raises(VlrtError, match=r"lower --max-batch \(1 fits\)"):
        fit_render_size(demo_model, 200, 112, sized_by_user=True, available=1024**3, **common)


def test_the_demo_model_shrinks_a_large_clip_it_was_not_sized_for_and_says_so(tmp_path, capsys):
    clip = write_video(tmp_path / "phone.mp4", moving_frames(2, (640, 360)))
    out = tmp_path / "out.mp4"
    code = main(["render", str(clip), "-o", str(out), "--model", "demo", "--backend", "ort", "--loop-n", "1", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    line = [text for text in err.splitlines() if "the demo model renders 640×360 input at" in text]
    assert len(line) == 1
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.width < 640 and abs(stream.width / stream.height - 16 / 9) < 0.1
