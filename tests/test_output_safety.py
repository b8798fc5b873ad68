"""An output never replaces what the run reads; a bad output is refused before the model loads;
--no-overwrite leaves existing files alone. Every refusal: one line, non-zero exit, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import write_frames

from vlrt.cli import main


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _clip(path: Path, frames: int = 3) -> Path:
    """A tiny H.264 clip written by PyAV directly."""
    rng = np.random.default_rng(5)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(frames):
            picture = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: a refusal must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("vlrt.render.pipeline.open_model", refuse)


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(["render", "--model", "demo", "--loop-n", "1", "--steps", "2", "--quiet", *args])
    return code, capsys.readouterr().err.strip()


def _one_line(code: int, err: str, *words: str) -> None:
    assert code != 0
    assert err.startswith("vlrt: error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("how", ["same path", "dotted path", "symlink", "hard link"])
def test_output_that_is_the_input_file_is_refused(how, tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    source = _clip(tmp_path / "same.mp4")
    (tmp_path / "sub").mkdir()
    output = {
        "same path": "same.mp4",
        "dotted path": "./sub/../same.mp4",
        "symlink": "link.mp4",
        "hard link": "hard.mp4",
    }[how]
    if how == "symlink":
        os.symlink(source, tmp_path / "link.mp4")
    if how == "hard link":
        os.link(source, tmp_path / "hard.mp4")
    before = _tree(tmp_path)
    code, err = _run(capsys, "same.mp4", "-o", output)
    _one_line(code, err, "is the input", "same.mp4", "choose another output")
    assert _tree(tmp_path) == before  # the source untouched, no settings file, no parts


def test_output_folder_that_is_the_input_folder_is_refused(tmp_path, capsys, no_model):
    frames = write_frames(tmp_path / "frames", [np.full((32, 32, 3), v, np.uint8) for v in (10, 20)], "{:06d}.png")
    before = _tree(tmp_path)
    for output in (str(frames), str(frames) + "/", str(tmp_path / "frames" / ".") + "/"):
        code, err = _run(capsys, str(frames), "-o", output)
        _one_line(code, err, "is the input")
    # One of the input frames as a single-image input: the folder output would write 000000.png over it.
    code, err = _run(capsys, str(frames / "000001.png"), "-o", str(frames) + "/", "--max-frames", "2")
    _one_line(code, err, "is the input", "000001.png")
    assert _tree(tmp_path) == before


def test_output_that_is_a_mask_or_reference_folder_is_refused(tmp_path, capsys, no_model):
    frames = write_frames(tmp_path / "frames", [np.full((32, 32, 3), 9, np.uint8)] * 2)
    masks = write_frames(tmp_path / "masks", [np.full((32, 32, 3), 255, np.uint8)] * 2, "{:06d}.png")
    refs = write_frames(tmp_path / "refs", [np.full((32, 32, 3), 1, np.uint8)] * 2)
    before = _tree(tmp_path)
    code, err = _run(capsys, str(frames), "-o", str(masks) + "/", "--use-mask", "--mask-directory", str(masks))
    _one_line(code, err, "is the mask")
    code, err = _run(capsys, str(frames), "-o", str(refs) + "/",
                     "--reference-frames-directory", f"{masks} !!! {refs}")
    _one_line(code, err, "is the reference folder")
    assert _tree(tmp_path) == before


def test_unknown_output_extension_fails_before_the_model_loads(tmp_path, capsys, no_model):
    _clip(tmp_path / "in.mp4")
    before = _tree(tmp_path)
    code, err = _run(capsys, str(tmp_path / "in.mp4"), "-o", str(tmp_path / "out.avi"))
    _one_line(code, err, "out.avi", ".mp4")
    code, err = _run(capsys, str(tmp_path / "in.mp4"), "-o", "-", "--codec", "mpeg4", "--lossless")
    _one_line(code, err, "mpeg4", "no lossless mode")
    code, err = _run(capsys, str(tmp_path / "in.mp4"), "-o", str(tmp_path / "o.mp4"), "--codec", "nosuchcodec")
    _one_line(code, err, "nosuchcodec")
    assert _tree(tmp_path) == before  # no out.avi.settings.toml


def test_no_overwrite_refuses_an_existing_output(tmp_path, capsys, no_model):
    source = _clip(tmp_path / "in.mp4")
    existing = tmp_path / "out.mp4"
    existing.write_bytes(b"the user's earlier render")
    folder = write_frames(tmp_path / "out", [np.zeros((32, 32, 3), np.uint8)], "{:06d}.png")  # 000001.png
    before = _tree(tmp_path)
    for flag in ("-n", "--no-overwrite"):
        code, err = _run(capsys, str(source), "-o", str(existing), flag)
        _one_line(code, err, "out.mp4", "exists", "--no-overwrite")
    code, err = _run(capsys, str(source), "-o", str(folder) + "/", "-n")
    _one_line(code, err, "000001.png", "exists")
    code, err = _run(capsys, str(source), "-o", str(tmp_path / "new.mp4"), "-n", "--save-every-loop",
                     "--loop-n", "2", "--preview", str(existing))
    _one_line(code, err, "out.mp4", "exists")
    assert _tree(tmp_path) == before


def test_no_overwrite_renders_a_new_output(tmp_path, capsys):
    source = _clip(tmp_path / "in.mp4")
    code, err = _run(capsys, str(source), "-o", str(tmp_path / "new.mp4"), "-n")
    assert code == 0, err
    with av.open(str(tmp_path / "new.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3
