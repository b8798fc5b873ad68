"""Bad input: one clear line on standard error, a non-zero exit status, and nothing that looks finished."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_frames

from vlrt.cli import main


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(["render", *args, "--quiet"])
    err = capsys.readouterr().err.strip()
    return code, err


def _nothing_complete(out: Path) -> bool:
    """No file at the output path, and no partial file that a player would take for the result."""
    siblings = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
    return not out.exists() and not any(name.endswith(".mp4") and "partial" not in name for name in siblings)


@pytest.fixture
def frames_dir(tmp_path):
    rng = np.random.default_rng(1)
    return write_frames(tmp_path / "in", [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)])


def _demo(*extra: str) -> list[str]:
    return ["--model", "demo", "--loop-n", "1", "--steps", "2", *extra]


CASES = [
    ("missing input", lambda d: [str(d.parent / "nope.mp4")], [], "nope.mp4"),
    ("empty folder", lambda d: [str(_empty(d))], [], "empty"),
    ("corrupt image", lambda d: [str(_corrupt_image(d))], [], "0002.png"),
    ("corrupt video", lambda d: [str(_corrupt_video(d))], [], "broken.mp4"),
    ("width not a multiple", lambda d: [str(d)], ["--width", "31"], "multiple of 2"),
    ("even temporal list", lambda d: [str(d)], ["--temporal-superimpose-alpha-list", "0.5,0.5"], "odd number"),
    ("schedule does not parse", lambda d: [str(d)], ["--denoising-schedule", "0.4 if loop_i<3 else"], "denoising_schedule"),
    ("unsafe schedule", lambda d: [str(d)], ["--seed-schedule", "__import__('os').system('touch CANARY')"], "seed_schedule"),
    ("attribute walk", lambda d: [str(d)], ["--prompt-schedule", "().__class__.__base__"], "prompt_schedule"),
    ("wrong type", lambda d: [str(d)], ["--step-schedule", "'many'"], "step_schedule"),
    ("unknown sampler", lambda d: [str(d)], ["--sampler-name", "Euler b"], "Euler b"),
]


def _empty(d: Path) -> Path:
    (d.parent / "empty").mkdir()
    return d.parent / "empty"


def _corrupt_image(d: Path) -> Path:
    (d / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return d


def _corrupt_video(d: Path) -> Path:
    path = d.parent / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    return path


@pytest.mark.parametrize("name, inputs, extra, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(name, inputs, extra, words, frames_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "result" / "out.mp4"
    out.parent.mkdir()
    code, err = _run(capsys, *inputs(frames_dir), "-o", str(out), *_demo(*extra))
    assert code != 0
    assert err.startswith("vlrt: error: ") and "\n" not in err, err
    assert words in err
    assert _nothing_complete(out)
    assert not (tmp_path / "CANARY").exists()


def test_model_folder_missing_a_component(tmp_path, frames_dir, capsys):
    from vlrt.demo import DEMO_MODEL_DIR

    broken = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, broken)
    shutil.rmtree(broken / "vae")
    out = tmp_path / "out.mp4"
    code, err = _run(capsys, str(frames_dir), "-o", str(out), "--model", str(broken))
    assert code != 0 and "vae/" in err and "\n" not in err
    assert _nothing_complete(out)


def test_missing_model_path_and_no_model(tmp_path, frames_dir, capsys):
    code, err = _run(capsys, str(frames_dir), "-o", str(tmp_path / "o.mp4"), "--model", str(tmp_path / "sd15"))
    assert code != 0 and "sd15" in err and "does not exist" in err
    code, err = _run(capsys, str(frames_dir), "-o", str(tmp_path / "o.mp4"))
    assert code != 0 and "--model" in err


def test_single_image_needs_max_frames(tmp_path, frames_dir, capsys):
    code, err = _run(capsys, str(frames_dir / "0001.png"), "-o", str(tmp_path / "o.mp4"), *_demo())
    assert code != 0 and "max-frames" in err.replace("_", "-")
