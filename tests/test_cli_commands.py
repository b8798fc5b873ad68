"""The README's commands and options that no other test drives: export, render --report,
--save-every-loop, and --resume of a folder output."""

from __future__ import annotations

import json

import numpy as np
from conftest import read_frames

from vlrt.cli import main

FAST = ["--model", "demo", "--backend", "torch", "--steps", "2", "--denoising-strength", "0.5", "--seed", "4", "--quiet"]


def test_export_builds_manifested_engines_that_render_then_loads(tmp_path, capsys):
    engines = tmp_path / "engines"
    code = main(["export", "--model", "demo", "--width", "32", "--height", "32", "--max-batch", "4",
                 "--engines", str(engines), "--quiet"])
    assert code == 0
    folders = sorted(p for p in engines.iterdir() if not p.name.startswith("."))
    assert sorted(f.name.split("-")[1] for f in folders) == ["unet", "vae_decoder", "vae_encoder"]
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["batch"] == {"min": 1, "max": 4} and (folder / "model.onnx").is_file()
    printed = capsys.readouterr().out
    assert "unet:" in printed and "vae_decoder:" in printed


def test_render_report_and_every_loop_outputs(clip_folder, tmp_path):
    out = tmp_path / "out.mp4"
    code = main(["render", str(clip_folder), "-o", str(out), "--loop-n", "2", "--save-every-loop", "--report", *FAST])
    assert code == 0
    assert out.is_file() and (tmp_path / "out-loop_1.mp4").is_file() and not (tmp_path / "out-loop_2.mp4").exists()
    assert (tmp_path / "out.mp4.flicker.png").is_file()
    report = json.loads((tmp_path / "out.mp4.flicker.json").read_text())
    assert len(report["per_frame"]["flicker"]) == 5  # per consecutive pair of the 6 frames
    settings = (tmp_path / "out.mp4.settings.toml").read_text()
    assert "complete = true" in settings and "seed = 4" in settings


def test_resume_of_a_finished_folder_is_refused_and_of_a_partial_one_completes(clip_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["render", str(clip_folder), "-o", str(out) + "/", "--loop-n", "2", "--temporal-superimpose-alpha-list",
            "0.25,0.5,0.25", *FAST]
    assert main(args) == 0
    full = read_frames(out)
    assert main([*args, "--resume"]) != 0 and "already complete" in capsys.readouterr().err
    # An interrupted render: the last frames missing and the settings marked incomplete.
    for name in ("000004.png", "000005.png"):
        (out / name).unlink()
    settings = out / "settings.toml"
    settings.write_text(settings.read_text().replace("complete = true", "complete = false"))
    assert main([*args, "--resume"]) == 0
    resumed = read_frames(out)
    assert len(resumed) == 6 and all(np.array_equal(a, b) for a, b in zip(full, resumed))
    assert main([*args[:-1], "--seed", "5", "--quiet", "--resume"]) != 0
    assert "setting seed is 5" in capsys.readouterr().err


def test_output_frame_rate_and_the_default_source_rate_over_extract_nth_frame(tmp_path):
    import av

    from vlrt.demo.clip import write_sample_clip

    clip = write_sample_clip(tmp_path / "clip.mp4", frames=12)
    with av.open(str(clip)) as container:
        source_fps = container.streams.video[0].average_rate
    for k, (extra, want) in enumerate(((["--output-frame-rate", "12.5"], 12.5), (["--extract-nth-frame", "3"], source_fps / 3))):
        out = tmp_path / f"out{k}.mkv"
        assert main(["render", str(clip), "-o", str(out), "--model", "demo", "--loop-n", "0", *extra, "--quiet"]) == 0
        with av.open(str(out)) as container:
            assert abs(float(container.streams.video[0].average_rate) - float(want)) < 1e-3
