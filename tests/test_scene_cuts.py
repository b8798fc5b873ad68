"""Scene cuts (issue 20, part 1): detected as the frames stream, or given; nothing of one shot
crosses into the next in the temporal blend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import read_frames, write_frames

from vlrt.cli import main
from vlrt.errors import VlrtError
from vlrt.image.scene_cuts import ShotTracker, parse_cut_list


def _shot(kind: int, count: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """`count` frames of one generated shot: a hue of its own and a slowly moving shape."""
    w, h = size
    frames = []
    hues = [(200, 40, 30), (10, 20, 110), (150, 255, 150), (255, 220, 0)]
    for i in range(count):
        picture = np.zeros((h, w, 3), np.uint8)
        picture[:] = hues[kind]
        picture[(kind % 2) :: 2 + kind, :] //= 2  # a texture of its own
        x = (2 * i) % (w - 10)
        picture[h // 3 : h // 3 + 10, x : x + 10] = 255 - np.array(hues[kind], np.uint8)
        frames.append(picture)
    return frames


def _pan(count: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """A slow pan over one wide gradient picture: no cut anywhere."""
    w, h = size
    wide = np.zeros((h, w * 3, 3), np.uint8)
    wide[..., 0] = np.linspace(0, 255, w * 3, dtype=np.uint8)[None, :]
    wide[..., 1] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    wide[..., 2] = 90
    return [wide[:, 2 * i : 2 * i + w].copy() for i in range(count)]


def _detected(frames: list[np.ndarray]) -> list[int]:
    tracker = ShotTracker("auto", 27.0, 24)
    for i, picture in enumerate(frames):
        tracker.shot_of(i, picture)
    return tracker.cuts


def test_three_cuts_are_found_at_their_frames_and_a_pan_has_none():
    shots = _shot(0, 20) + _shot(1, 25) + _shot(2, 18) + _shot(3, 20)
    assert _detected(shots) == [20, 45, 63]
    assert _detected(_pan(60)) == []


def test_a_given_list_labels_the_shots_and_bad_lists_are_refused():
    tracker = ShotTracker("12, 5", 27.0, 24)
    assert [tracker.shot_of(i, np.zeros((2, 2, 3), np.uint8)) for i in (0, 4, 5, 11, 12, 40)] == [0, 0, 5, 5, 12, 12]
    assert parse_cut_list("none") == () and parse_cut_list("auto") is None
    for bad in ("12,x", "0,5"):
        with pytest.raises(VlrtError, match="scene_cuts"):
            parse_cut_list(bad)


def _render(source: Path, out: Path, *extra: str) -> list[np.ndarray]:
    code = main(["render", str(source), "-o", str(out) + "/", "--model", "demo", "--backend", "torch", "--loop-n", "2",
                 "--steps", "2", "--denoising-strength", "0.5", "--seed", "7", "--max-batch", "1",
                 "--temporal-superimpose-alpha-list", "0.5,1,0.5", "--superimpose-alpha", "0.8", "--quiet", *extra])
    assert code == 0
    return read_frames(out)


def test_shots_render_as_if_alone_with_cuts_and_blend_across_without(tmp_path):
    a, b = _shot(0, 20, (32, 24)), _shot(1, 16, (32, 24))
    both = write_frames(tmp_path / "both", a + b)
    alone_a = _render(write_frames(tmp_path / "a", a), tmp_path / "ra")
    alone_b = _render(write_frames(tmp_path / "b", b), tmp_path / "rb")
    cut = _render(both, tmp_path / "cut", "--scene-cuts", "auto")
    for got, want in zip(cut, alone_a + alone_b, strict=True):
        assert np.abs(got.astype(int) - want).max() <= 1
    settings = tomllib.loads((tmp_path / "cut" / "settings.toml").read_text(encoding="utf-8"))
    assert settings["vlrt"]["scene_cuts"] == [20]
    blended = _render(both, tmp_path / "blended", "--scene-cuts", "none")
    assert np.abs(blended[20].astype(int) - alone_b[0]).mean() > 3  # shot A ghosts into B's first frame
    given = _render(both, tmp_path / "given", "--scene-cuts", "20")
    for got, want in zip(given, cut, strict=True):
        np.testing.assert_array_equal(got, want)


def test_colour_anchor_first_anchors_each_shot_to_its_own_first_frame(tmp_path):
    a, b = _shot(0, 20, (32, 24)), _shot(1, 16, (32, 24))
    alone_b = _render(write_frames(tmp_path / "b", b), tmp_path / "rb", "--color-correction", "first")
    cut = _render(write_frames(tmp_path / "both", a + b), tmp_path / "cut", "--scene-cuts", "20", "--color-correction", "first")
    for got, want in zip(cut[20:], alone_b, strict=True):
        assert np.abs(got.astype(int) - want).max() <= 1
