"""`vlrt report` (flicker measured, net of the source's motion) and `vlrt doctor` (never crashes)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlrt.demo.clip import sample_frames
from vlrt.errors import VlrtError
from vlrt.tools.doctor import add_doctor_parser
from vlrt.tools.report import add_report_parser, flicker_report, report_beside_output, write_plot

SIZE = (64, 48)
FRAMES = 16
BRIGHTEN = 25


def _write(folder: Path, frames: list[np.ndarray]) -> str:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:06d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    """The sample clip as is, with every other frame brightened, and a shorter cut of it."""
    root = tmp_path_factory.mktemp("clips")
    frames = sample_frames(FRAMES, SIZE)
    flickered = [
        np.clip(f.astype(np.int16) + BRIGHTEN, 0, 255).astype(np.uint8) if i % 2 else f for i, f in enumerate(frames)
    ]
    return {
        "clean": _write(root / "clean", frames),
        "flicker": _write(root / "flicker", flickered),
        "short": _write(root / "short", frames[:-3]),
    }


def _cli(*extra_parsers):
    parser = argparse.ArgumentParser(prog="vlrt")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in extra_parsers:
        add(commands)
    return parser


def _run(argv: list[str]) -> int:
    args = _cli(add_report_parser, add_doctor_parser).parse_args(argv)
    return args.run(args)


def test_injected_flicker_is_measured(clips):
    clean = flicker_report(clips["clean"]).summary()
    flickered = flicker_report(clips["flicker"]).summary()
    ratio = flickered["mean_flicker"] / clean["mean_flicker"]
    print(f"mean flicker {flickered['mean_flicker']:.3f} vs {clean['mean_flicker']:.3f}: ratio {ratio:.1f}")
    assert ratio >= 5
    assert clean["frame_count"] == flickered["frame_count"] == FRAMES


def test_excess_discounts_source_motion(clips):
    clean = flicker_report(clips["clean"], against=clips["clean"])
    flickered = flicker_report(clips["flicker"], against=clips["clean"])
    assert clean.summary()["mean_flicker"] > 1  # the source moves ...
    assert abs(clean.summary()["mean_excess"]) < 0.5  # ... and none of that counts as flicker
    assert flickered.summary()["mean_excess"] > BRIGHTEN / 2
    assert len(flickered.excess) == FRAMES - 1


def test_input_of_another_size_is_compared_at_the_videos(clips, tmp_path):
    big = _write(tmp_path / "big", sample_frames(FRAMES, (SIZE[0] * 2, SIZE[1] * 2)))
    report = flicker_report(clips["clean"], against=big)
    assert abs(report.summary()["mean_excess"]) < 0.5


def test_length_mismatch_names_both(clips):
    with pytest.raises(VlrtError) as caught:
        flicker_report(clips["clean"], against=clips["short"])
    message = str(caught.value)
    assert clips["clean"] in message and clips["short"] in message
    assert f"{FRAMES} frames" in message and f"has {FRAMES - 3}" in message
    with pytest.raises(VlrtError, match=f"has {FRAMES - 3} frames but .* has {FRAMES}"):
        flicker_report(clips["short"], against=clips["clean"])


def test_plot_is_a_real_picture(clips, tmp_path):
    path = tmp_path / "plot.png"
    write_plot(flicker_report(clips["flicker"], against=clips["clean"]), path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 300 <= image.width <= 4000 and 200 <= image.height <= 4000
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 10


def test_report_command_prints_summary_and_writes_files(clips, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert _run(["report", clips["flicker"], "--against", clips["clean"], "--json", str(out_json), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and "p95" in printed and "excess" in printed
    plot = Path(clips["flicker"] + ".flicker.png")  # beside the folder, never inside it
    assert plot.is_file() and not any(Path(clips["flicker"]).glob("*flicker*"))
    data = json.loads(out_json.read_text())
    assert data["summary"]["frame_count"] == FRAMES
    assert len(data["per_frame"]["excess"]) == FRAMES - 1


def test_report_beside_output(clips, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(clips["flicker"], output)
    report = report_beside_output(str(output) + "/", clips["clean"])
    assert report.summary()["mean_excess"] > BRIGHTEN / 2
    assert (tmp_path / "out.flicker.png").is_file() and (tmp_path / "out.flicker.json").is_file()
    with pytest.raises(VlrtError, match="'-'"):
        report_beside_output("-", clips["clean"])


def test_one_frame_is_a_clear_error(tmp_path):
    single = _write(tmp_path / "one", sample_frames(1, SIZE))
    with pytest.raises(VlrtError, match="only one frame"):
        flicker_report(single)


def _doctor(capsys, engines: Path) -> str:
    assert _run(["doctor", "--engines", str(engines)]) == 0
    return capsys.readouterr().out


def test_doctor_on_a_cpu_machine(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = _doctor(capsys, tmp_path / "engines")
    assert "no CUDA GPU" in out
    assert "TensorRT:     not installed" in out
    assert "ffmpeg:       not on PATH" in out and "does not need it" in out
    assert "does not exist" in out
    assert "--backend ort is the fastest CPU path" in out
    assert len(out.splitlines()) <= 25


def test_doctor_without_onnxruntime_or_anything_else(monkeypatch, capsys, tmp_path):
    for name in ("onnxruntime", "tensorrt", "polygraphy", "torch", "av"):
        monkeypatch.setitem(sys.modules, name, None)
    out = _doctor(capsys, tmp_path)
    assert "ONNX Runtime: missing" in out and "pip install onnxruntime" in out
    assert "torch:" in out and "pip install torch" in out
    assert "PyAV:" in out and "pip install av" in out


def test_doctor_with_a_gpu_and_tensorrt(monkeypatch, capsys, tmp_path):
    props = types.SimpleNamespace(name="Fake H100", total_memory=80 * 1024**3, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    engines = tmp_path / "engines"
    entry = engines / "0123456789ab-unet-64x64-b8-fp16"
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{}")
    (entry / "model.plan").write_bytes(b"\0" * 2048)
    (engines / ".half-built.tmp-1").mkdir()

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = _doctor(capsys, engines)
    assert "Fake H100, 80.0 GiB, compute capability 9.0" in out
    assert "1 engine (1 with TensorRT plans)" in out
    assert "pip install tensorrt-cu12 polygraphy --extra-index-url https://pypi.nvidia.com" in out

    from fake_trt import install

    install(monkeypatch, version="10.9.0", runtime_fails=True)  # imports, but cannot start on this GPU
    out = _doctor(capsys, engines)
    assert "TensorRT:     10.9.0, unusable: TensorRT cannot start a runtime (CUDA initialization failure" in out
    assert "fastest backend here: --backend torch on the GPU" in out

    install(monkeypatch, version="10.9.0", polygraphy="0.48.1")
    out = _doctor(capsys, engines)
    assert "TensorRT:     10.9.0\n" in out and "polygraphy:   polygraphy 0.48.1 is older than 0.49.1" in out
    assert "fastest backend here: --backend trt" in out and "pip install -U polygraphy (0.49.1 or later)" in out


def test_doctor_survives_a_probe_that_raises(monkeypatch, capsys, tmp_path):
    def broken() -> bool:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    out = _doctor(capsys, tmp_path)
    assert "could not check (RuntimeError: driver exploded)" in out


def test_doctor_rejects_unknown_arguments():
    with pytest.raises(SystemExit) as caught:
        _run(["doctor", "--no-such-option"])
    assert caught.value.code == 2
