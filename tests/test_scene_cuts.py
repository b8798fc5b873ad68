"""Scene cuts (issue 20, part 1): detected as the frames stream, or given; nothing of one shot
crosses into the next in the temporal blend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import read_frames, shot_frames, write_frames

from vlrt.cli import main
from vlrt.errors import VlrtError
from vlrt.image.scene_cuts import ShotTracker, parse_cut_list


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
    shots = shot_frames(0, 20) + shot_frames(1, 25) + shot_frames(2, 18) + shot_frames(3, 20)
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
    a, b = shot_frames(0, 20, (32, 24)), shot_frames(1, 16, (32, 24))
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
    a, b = shot_frames(0, 20, (32, 24)), shot_frames(1, 16, (32, 24))
    alone_b = _render(write_frames(tmp_path / "b", b), tmp_path / "rb", "--color-correction", "first")
    cut = _render(write_frames(tmp_path / "both", a + b), tmp_path / "cut", "--scene-cuts", "20", "--color-correction", "first")
    for got, want in zip(cut[20:], alone_b, strict=True):
        assert np.abs(got.astype(int) - want).max() <= 1


# --- FastDVDNet, resume, preview and report across a cut ------------------------------------------
DENOISED = ("--video-post-process-method", "fastdvdnet", "--scene-cuts", "auto")


@pytest.fixture(scope="module")
def two_shots(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """Shot A (20 frames) then shot B (16), as a folder, and the auto-cut FastDVDNet render of it."""
    folder = tmp_path_factory.mktemp("two")
    source = write_frames(folder / "in", shot_frames(0, 20, (32, 24)) + shot_frames(1, 16, (32, 24)))
    return source, _render(source, folder / "out", *DENOISED)


def test_with_fastdvdnet_nothing_of_the_first_shot_reaches_the_second(two_shots, tmp_path):
    """FastDVDNet's noise is seeded by the absolute frame index, so B alone is no reference: other
    content in A must leave B's frames bit for bit the same (the 5-frame window mirrors at the cut)."""
    _, rendered = two_shots
    other = write_frames(tmp_path / "in", shot_frames(3, 20, (32, 24)) + shot_frames(1, 16, (32, 24)))
    changed = _render(other, tmp_path / "out", *DENOISED)
    assert np.abs(changed[19].astype(int) - rendered[19]).mean() > 3  # A's frames did change
    for got, want in zip(changed[20:], rendered[20:], strict=True):
        np.testing.assert_array_equal(got, want)


def test_an_interrupted_render_with_cuts_resumes_to_the_same_frames(two_shots, tmp_path):
    """Frames 0–22 are kept (PNG writes are atomic: an interrupted render leaves whole files), the rest
    rendered again from a resume point just after the cut: detection replays from frame 0."""
    source, rendered = two_shots
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.toml").write_text(
        (source.parent / "out" / "settings.toml").read_text(encoding="utf-8").replace("complete = true", "complete = false"),
        encoding="utf-8",
    )
    for i in range(23):
        (out / f"{i:06d}.png").write_bytes((source.parent / "out" / f"{i:06d}.png").read_bytes())
    resumed = _render(source, out, *DENOISED, "--resume")
    assert len(resumed) == len(rendered)
    for got, want in zip(resumed, rendered, strict=True):
        np.testing.assert_array_equal(got, want)
    settings = tomllib.loads((out / "settings.toml").read_text(encoding="utf-8"))
    assert settings["vlrt"]["scene_cuts"] == [20] and settings["vlrt"]["complete"] is True


def test_a_preview_frame_after_a_cut_is_the_frame_of_the_whole_render(two_shots, demo_model):
    from vlrt.render.pipeline import render_span
    from vlrt.settings.config import build_settings

    source, rendered = two_shots
    settings = build_settings(overrides=dict(
        model="demo", backend="torch", loop_n=2, steps=2, denoising_strength=0.5, seed=7, max_batch=1,
        temporal_superimpose_alpha_list="0.5,1,0.5", superimpose_alpha=0.8, video_post_process_method="fastdvdnet",
    ))
    assert settings.scene_cuts == "auto"  # the default
    got: dict[int, np.ndarray] = {}
    render_span(settings, str(source), 21, 22, model=demo_model, on_frame=lambda _p, f: got.__setitem__(f.index, f.image))
    np.testing.assert_array_equal(got[21], rendered[21])


def test_the_report_marks_the_recorded_cuts_and_leaves_their_change_out(two_shots, tmp_path, capsys):
    from vlrt.tools.report import CUT_COLOUR, PLOT_SIZE, flicker_report

    source, rendered = two_shots
    output = source.parent / "out"
    plain = flicker_report(str(output))
    assert plain.cuts == ()
    changes = list(plain.flicker)
    assert changes[19] > np.mean(changes[:19] + changes[20:]) + 5  # the cut's change is not flicker
    assert main(["report", str(output), "--plot", str(tmp_path / "plot.png"), "--json", str(tmp_path / "r.json"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "scene cuts at frames 20" in printed
    import json

    numbers = json.loads((tmp_path / "r.json").read_text())
    assert numbers["cuts"] == [20]
    assert numbers["summary"]["mean_flicker"] == pytest.approx(np.mean(changes[:19] + changes[20:]), abs=1e-3)
    assert plain.summary()["mean_flicker"] > numbers["summary"]["mean_flicker"] + 0.1
    plot = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "plot.png").convert("RGB"))
    assert plot.shape[:2] == (PLOT_SIZE[1], PLOT_SIZE[0])
    cut_pixels = np.all(plot == np.array(CUT_COLOUR, np.uint8), axis=-1)
    columns = np.flatnonzero(cut_pixels.sum(axis=0) > 20)  # a dashed line down the plot, in one column
    assert len(columns) >= 1
    left, right = 72, PLOT_SIZE[0] - 24
    expected_x = left + (20 - 1) / (35 - 1) * (right - left)
    assert abs(columns[0] - expected_x) <= 1.5
