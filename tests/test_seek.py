"""Starting a source at frame k (what a segment does): the frames equal those a read from the
first frame gives at k, k+1, …, for every container, codec and input kind; a video file really
seeks (decodes only from the keyframe before k); exact frame counts."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import write_frames

import vlrt.io.seek as seek
from vlrt.demo.clip import sample_frames, write_sample_clip
from vlrt.errors import VlrtError
from vlrt.io.sources import open_source

FRAMES, SIZE = 60, (32, 24)
# (file name, codec, pixel format, options): B-frames and short GOPs in mp4 and Matroska (closed
# and open GOPs), VP9 in WebM, all-keyframe FFV1, and MPEG-TS, whose demuxer seeks past the target.
VIDEOS = [
    ("x264.mp4", "libx264", "yuv420p", {"g": "12", "bf": "3"}),
    ("x264-open-gop.mkv", "libx264", "yuv420p", {"g": "12", "bf": "3", "x264-params": "open-gop=1"}),
    ("vp9.webm", "libvpx-vp9", "yuv420p", {"g": "10"}),
    ("ffv1.mkv", "ffv1", "bgr0", {}),
    ("x264.ts", "libx264", "yuv420p", {"g": "12", "bf": "3"}),
]


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    return sample_frames(FRAMES, SIZE)


def write_video(path: Path, pictures: list[np.ndarray], codec: str, pix_fmt: str, options: dict) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=24, options=options)
        stream.width, stream.height, stream.pix_fmt = *SIZE, pix_fmt
        for i, picture in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format=pix_fmt)
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory, pictures) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {name: write_video(folder / name, pictures, *rest) for name, *rest in VIDEOS}


def images(source) -> list[np.ndarray]:
    return [frame.image for frame in source]


@pytest.mark.parametrize("name", [v[0] for v in VIDEOS])
def test_every_start_frame_of_a_video_gives_the_frames_read_from_the_first(videos, name):
    whole = images(open_source(str(videos[name])))
    assert len(whole) == FRAMES
    assert not np.array_equal(whole[0], whole[FRAMES // 2])  # the frames differ, so a wrong frame shows
    for start in range(1, FRAMES):
        with open_source(str(videos[name]), start=start) as source:
            frames = list(source)
        assert [f.index for f in frames] == list(range(start, FRAMES))
        for frame, expected in zip(frames, whole[start:]):
            np.testing.assert_array_equal(frame.image, expected)


@pytest.mark.parametrize("name", ["x264.mp4", "ffv1.mkv", "vp9.webm"])
def test_a_video_file_seeks_instead_of_decoding_from_the_start(videos, name, monkeypatch):
    decoded = []
    original = seek.decoded_frames

    def counting(container, label):
        for frame in original(container, label):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(seek, "decoded_frames", counting)
    with open_source(str(videos[name]), start=50) as source:
        assert [f.index for f in source] == list(range(50, FRAMES))
    # GOPs are at most 12 frames: decoding starts at the keyframe before frame 50, not at frame 0.
    assert 10 <= len(decoded) <= 10 + 12


def test_subsampling_and_max_frames_number_frames_as_from_the_first(videos):
    path = str(videos["x264.mp4"])
    whole = images(open_source(path, extract_nth_frame=3, max_frames=15))
    assert len(whole) == 15
    with open_source(path, extract_nth_frame=3, max_frames=15, start=7) as source:
        frames = list(source)
    assert [f.index for f in frames] == list(range(7, 15))
    for frame, expected in zip(frames, whole[7:]):
        np.testing.assert_array_equal(frame.image, expected)


def test_folders_raw_files_single_images_and_pipes_start_at_the_frame(tmp_path, pictures):
    folder = write_frames(tmp_path / "frames", pictures[:10])
    raw = tmp_path / "clip.rgb"
    raw.write_bytes(b"".join(p.tobytes() for p in pictures[:10]))
    raw_options = dict(input_format="rawvideo", input_size=SIZE, input_fps=Fraction(24))
    cases = [
        (lambda: open_source(str(folder), start=4), pictures[4:10]),
        (lambda: open_source(str(folder), extract_nth_frame=2, start=2), pictures[4:10:2]),
        (lambda: open_source(str(raw), start=4, **raw_options), pictures[4:10]),
        (lambda: open_source("-", stdin=io.BytesIO(raw.read_bytes()), start=4, **raw_options), pictures[4:10]),
        (lambda: open_source(str(folder / "0001.png"), max_frames=5, start=3), [pictures[0]] * 2),
    ]
    for opened, expected in cases:
        with opened() as source:
            frames = list(source)
        assert [f.index for f in frames] == list(range(frames[0].index, frames[0].index + len(expected)))
        assert len(frames) == len(expected)
        for frame, picture in zip(frames, expected):
            np.testing.assert_array_equal(frame.image, picture)
    with open_source(str(folder), start=4) as source:
        assert source.info.frame_count == 10  # info describes the whole input


def test_a_start_past_the_end_is_one_clear_error(videos, tmp_path, pictures):
    folder = write_frames(tmp_path / "frames", pictures[:3])
    for spec in (str(videos["x264.mp4"]), str(folder)):
        with pytest.raises(VlrtError, match="fewer than 201 frames"):
            open_source(spec, start=200)


def test_exact_count_counts_every_frame_the_decoder_gives(videos, tmp_path):
    clip = write_sample_clip(tmp_path / "clip.mp4", frames=37, fps=24, size=SIZE)  # with AAC sound
    for path in [clip, *videos.values()]:
        decoded = len(images(open_source(str(path))))
        assert open_source(str(path), exact_count=True).info.frame_count == decoded
        assert open_source(str(path), exact_count=True, extract_nth_frame=4).info.frame_count == -(-decoded // 4)
        assert open_source(str(path), exact_count=True, max_frames=5).info.frame_count == 5
