"""--draft: the same settings at half the size, a quarter of the steps and the --draft-vae, labelled in
the log and the settings file, and never written over a full render."""

from __future__ import annotations

import numpy as np
import pytest
import tomllib
from conftest import read_frames
from test_tiny_vae import random_tiny_vae

from vlrt.cli import main
from vlrt.render import preview as preview_module
from vlrt.settings.config import build_settings
from vlrt.settings.draft import draft_size, draft_steps
from vlrt.settings.params import ParamResolver

BASE = ["--model", "demo", "--backend", "torch", "--loop-n", "2", "--steps", "8", "--denoising-strength", "0.5",
        "--cfg-scale", "1", "--seed", "5", "--max-frames", "3", "--temporal-superimpose-alpha-list", "0.2,0.6,0.2"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("draft_vae") / "taesd"
    random_tiny_vae().save_pretrained(folder)
    return folder


def test_rules():
    assert [draft_steps(n) for n in (1, 3, 4, 7, 20, 30)] == [1, 1, 1, 1, 5, 7]
    assert draft_size(64, 48, 2) == (32, 24) and draft_size(512, 768, 8) == (256, 384)
    assert draft_size(100, 24, 8) == (48, 8)  # rounded down to the VAE's multiple, never below it
    s = build_settings(overrides=dict(draft=True, loop_n=2, step_schedule="9 if loop_i == 1 else 3"))
    resolver = ParamResolver(s, 1, 1)
    assert (resolver(0, 0).steps, resolver(0, 1).steps) == (2, 1)  # a scheduled step count is quartered too


def test_a_draft_is_the_same_render_at_half_size_quarter_steps_and_the_draft_vae(clip_folder, tiny_folder, tmp_path, capsys):
    draft, explicit = tmp_path / "draft", tmp_path / "explicit"
    assert main(["render", str(clip_folder), "-o", f"{draft}/", *BASE, "--draft", "--draft-vae", str(tiny_folder)]) == 0
    log = capsys.readouterr().err
    assert "DRAFT, not the final render: 32×24 (the full render: 64×48)" in log and "(8 → 2)" in log
    assert main(["render", str(clip_folder), "-o", f"{explicit}/", *BASE, "--quiet", "--width", "32", "--height", "24",
                 "--steps", "2", "--vae", str(tiny_folder)]) == 0
    got, want = read_frames(draft), read_frames(explicit)
    assert len(got) == 3 and got[0].shape == (24, 32, 3)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))

    recorded = tomllib.loads((draft / "settings.toml").read_text())
    assert recorded["render"]["draft"] is True and recorded["render"]["steps"] == 8 and "width" not in recorded["render"]
    assert recorded["vlrt"]["draft"].startswith("DRAFT, not the final render: 32×24")
    # Read back, the settings file renders the same draft (the size is halved once, from the source's).
    again = tmp_path / "again"
    assert main(["render", str(clip_folder), "-o", f"{again}/", "--config", str(draft / "settings.toml"), "--quiet"]) == 0
    assert all(np.array_equal(a, b) for a, b in zip(read_frames(again), got))


def test_a_draft_never_replaces_a_full_render(clip_folder, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["render", str(clip_folder), "-o", str(out), *BASE, "--quiet"]) == 0
    before = out.read_bytes(), (tmp_path / "out.mp4.settings.toml").read_text()
    assert main(["render", str(clip_folder), "-o", str(out), *BASE, "--draft", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "a draft never replaces it" in err and "out.draft.mp4" in err and len(err.strip().splitlines()) == 1
    assert (out.read_bytes(), (tmp_path / "out.mp4.settings.toml").read_text()) == before
    # Beside it, and over an earlier draft, a draft is written.
    beside = tmp_path / "out.draft.mp4"
    for _ in range(2):
        assert main(["render", str(clip_folder), "-o", str(beside), *BASE, "--draft", "--quiet"]) == 0
    assert main(["render", str(clip_folder), "-o", str(tmp_path / "seg.mp4"), *BASE, "--draft", "--segments", "2",
                 "--quiet"]) != 0
    assert "--draft renders in one process" in capsys.readouterr().err


def test_preview_draft_renders_half_size_labelled_cells(clip_folder, tmp_path, monkeypatch, capsys):
    seen = {}
    real = preview_module.sweep_grid

    def spy(combos, frames, render_frame, show_loops):
        def render(settings, f):
            pictures = render_frame(settings, f)
            seen.setdefault("shapes", []).extend(p.shape for p in pictures.values())
            return pictures

        seen["labels"] = [label for label, _ in combos]
        return real(combos, frames, render, show_loops)

    monkeypatch.setattr(preview_module, "sweep_grid", spy)
    assert main(["preview", str(clip_folder), "-o", str(tmp_path / "grid.png"), *BASE, "--frames", "0,2",
                 "--sweep", "superimpose_alpha=0.2,0.9", "--draft"]) == 0
    assert seen["labels"] == ["superimpose_alpha=0.2 (DRAFT)", "superimpose_alpha=0.9 (DRAFT)"]
    assert set(seen["shapes"]) == {(24, 32, 3)}
    assert "a DRAFT" in capsys.readouterr().err
