"""`vlrt preview`: the grid's layout, and that only the chosen frames are rendered."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vlrt.cli import main
from vlrt.image.contact_sheet import GAP, LABEL_HEIGHT
from vlrt.stages.loop_pass import LoopPass


def test_two_sweeps_of_two_values_on_three_frames(clip_folder, tmp_path, monkeypatch):
    started = []
    original = LoopPass._start

    def spy(self, f):
        started.append((self.loop_index, f))
        return original(self, f)

    monkeypatch.setattr(LoopPass, "_start", spy)
    out = tmp_path / "grid.png"
    code = main([
        "preview", str(clip_folder), "-o", str(out), "--model", "demo", "--backend", "torch", "--frames", "0,2,5",
        "--sweep", "superimpose_alpha=0.2,0.9", "--sweep", "denoising_strength=0.3,0.6",
        "--loop-n", "1", "--steps", "4", "--seed", "1", "--quiet",
    ])
    assert code == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    cell_h, cell_w = 48 * 2, 64 * 2  # 64×48 frames enlarged ×2 to reach the 96-px minimum cell width
    assert sheet.shape[0] == LABEL_HEIGHT + 4 * (cell_h + GAP)
    label_w = sheet.shape[1] - 3 * (cell_w + GAP)
    assert label_w > 50  # room for the row labels
    # Only the chosen frames were rendered: 4 settings × 3 frames, one pass, no temporal context.
    assert sorted(started) == sorted([(0, f) for f in (0, 2, 5)] * 4)
    # Rows differ with the settings (alpha 0.2 vs 0.9 at the same denoise), columns with the frames.
    def cell(r, c):
        top, left = LABEL_HEIGHT + r * (cell_h + GAP), label_w + c * (cell_w + GAP)
        return sheet[top : top + cell_h, left : left + cell_w].astype(int)

    assert np.abs(cell(0, 0) - cell(2, 0)).mean() > 2
    assert np.abs(cell(0, 0) - cell(0, 2)).mean() > 2


def test_preview_rejects_an_unknown_sweep_setting(clip_folder, tmp_path, capsys):
    code = main(["preview", str(clip_folder), "-o", str(tmp_path / "g.png"), "--model", "demo",
                 "--sweep", "superimpose_alfa=0.1,0.2", "--quiet"])
    assert code != 0 and "superimpose_alfa" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_sweeping_a_model_setting_is_refused_in_one_line(clip_folder, tmp_path, capsys):
    code = main(["preview", str(clip_folder), "-o", str(tmp_path / "g.png"), "--model", "demo", "--sweep", "clip_skip=1,2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and "--sweep clip_skip" in err
    assert not (tmp_path / "g.png").exists()


def test_show_loops_gives_a_row_per_loop_pass(clip_folder, tmp_path):
    out = tmp_path / "grid.png"
    code = main(["preview", str(clip_folder), "-o", str(out), "--model", "demo", "--backend", "torch", "--frames", "1",
                 "--sweep", "superimpose_alpha=0.3,0.9", "--show-loops", "--loop-n", "3", "--steps", "2", "--quiet"])
    assert code == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape[0] == LABEL_HEIGHT + 2 * 3 * (48 * 2 + GAP)  # 2 settings × 3 passes
