"""`vlrt ui` without a browser: the panel is the settings' definitions, its values make the command
line's settings, bad settings fail with the command line's message, the progress bar is read back."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import tomllib
from tqdm import tqdm

from vlrt.cli import build_parser, settings_from_args
from vlrt.errors import VlrtError
from vlrt.settings.config import Settings, build_settings
from vlrt.ui.panel import FIELDS, check, load_values, save_values, settings_arguments
from vlrt.ui.runner import parse_bar

gr = pytest.importorskip("gradio")


def defaults() -> dict[str, object]:
    return {f.name: (f.default_factory() if f.default is MISSING else f.default) for f in fields(Settings)}


def widget_values(**changes: object) -> dict[str, object]:
    """Every setting as the page's widgets hold it: empty boxes for None, one list item a line."""
    values = {}
    for name, default in {**defaults(), **changes}.items():
        if isinstance(default, list):
            default = "\n".join(default)
        values[name] = "" if default is None else default
    return values


def test_every_render_setting_has_a_widget_with_its_definition() -> None:
    from vlrt.ui.app import build

    page = build()
    widgets = {b.elem_id.removeprefix("setting-"): b for b in page.blocks.values() if (b.elem_id or "").startswith("setting-")}
    definitions = {f.name: f for f in fields(Settings)}
    assert set(widgets) == set(definitions)
    for name, f in definitions.items():
        widget = widgets[name]
        assert widget.label == name
        assert widget.info.startswith(f.metadata["help"])
        default = f.default_factory() if f.default is MISSING else f.default
        if f.metadata["choices"]:
            assert isinstance(widget, gr.Dropdown)
            assert [value for _, value in widget.choices] == list(f.metadata["choices"])
        if isinstance(default, bool):
            assert isinstance(widget, gr.Checkbox)
        assert widget.value == ("" if default is None else "" if default == [] else default), name
    # The render's own command line offers no setting the panel lacks.
    render = build_parser()._subparsers._group_actions[0].choices["render"]
    assert {a.dest for a in render._actions} >= set(definitions)


def test_the_panel_makes_the_command_lines_settings() -> None:
    values = widget_values(
        loop_n=3, superimpose_alpha=0.15, fix_seed=False, temporal_superimpose_alpha_list="0.1,0.8,0.1",
        prompt="(ink:1.2), paper", max_frames="7", output_frame_rate="12.5", lora="a.safetensors:0.7\nb.safetensors",
        resize_mode=2, sampler_name="DDIM", seed=42, codec="libx264rgb", denoising_schedule="0.4 if loop_i<2 else 0.3",
    )
    argv = settings_arguments(values)
    args = build_parser().parse_args(["render", "in.mp4", "-o", "out.mp4", *argv])
    expected = build_settings(overrides={
        "loop_n": 3, "superimpose_alpha": 0.15, "fix_seed": False, "temporal_superimpose_alpha_list": "0.1,0.8,0.1",
        "prompt": "(ink:1.2), paper", "max_frames": 7, "output_frame_rate": 12.5,
        "lora": ["a.safetensors:0.7", "b.safetensors"], "resize_mode": 2, "sampler_name": "DDIM", "seed": 42,
        "codec": "libx264rgb", "denoising_schedule": "0.4 if loop_i<2 else 0.3",
    })
    assert settings_from_args(args) == expected == check(values)
    assert "--loop-n" in argv and "--model" not in argv  # defaults are left to the command line


@pytest.mark.parametrize(("name", "text", "says"), [
    ("temporal_superimpose_alpha_list", "0.5,0.5", "it needs an odd number"),
    ("prompt_schedule", "__import__('os').system('touch pwned')", "prompt_schedule"),
    ("max_frames", "many", "max_frames"),
])
def test_a_bad_setting_fails_with_the_command_lines_message(tmp_path: Path, name: str, text: str, says: str) -> None:
    with pytest.raises(VlrtError) as caught:
        check(widget_values(**{name: text}))
    cli = subprocess.run([sys.executable, "-m", "vlrt", "render", "in.mp4", "-o", "out.mkv", "--model", "demo",
                          f"--{name.replace('_', '-')}", text], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode != 0 and says in str(caught.value)
    if name != "max_frames":  # argparse refuses a non-number itself, with its own usage text
        assert cli.stderr.strip().splitlines()[-1] == f"vlrt: error: {caught.value}"
    assert not (tmp_path / "pwned").exists() and list(tmp_path.iterdir()) == []


def test_a_config_saved_from_the_panel_reads_back(tmp_path: Path) -> None:
    values = widget_values(loop_n=4, prompt="sea", fix_seed=False, lora="x.safetensors", max_frames="9")
    path = tmp_path / "run.toml"
    save_values(values, path)
    data = tomllib.loads(path.read_text())["render"]
    assert (data["loop_n"], data["prompt"], data["fix_seed"], data["lora"], data["max_frames"]) == (4, "sea", False,
                                                                                                   ["x.safetensors"], 9)
    loaded = load_values(path)
    assert {n: loaded[n] for n in ("loop_n", "prompt", "fix_seed", "lora", "max_frames")} == {
        "loop_n": 4, "prompt": "sea", "fix_seed": False, "lora": "x.safetensors", "max_frames": "9"}
    with pytest.raises(VlrtError, match="not a .toml file"):
        save_values(values, tmp_path)


def test_progress_is_read_from_tqdms_own_bar() -> None:
    known = tqdm.format_meter(5, 10, 2.0, unit="frame", prefix="render", postfix="L1:7 L2:5", ncols=200)
    progress = parse_bar(known)
    assert (progress.done, progress.total, progress.passes, progress.eta) == (5, 10, "L1:7 L2:5", "00:02")
    assert progress.rate == "2.50frame/s"
    streaming = parse_bar(tqdm.format_meter(3, None, 1.0, unit="frame", prefix="render", postfix="L1:4"))
    assert (streaming.done, streaming.total, streaming.passes) == (3, None, "L1:4")
    assert parse_bar("vlrt: wrote 10 frames to out.mkv in 1.0 s") is None


def test_every_field_is_placed_in_one_group() -> None:
    assert [f.name for f in FIELDS] == ["model", *[f.name for f in fields(Settings) if f.name != "model"]]
    assert {f.name: f.group for f in FIELDS}["superimpose_alpha_schedule"] == "Advanced Settings of Video Loopback"


def test_listening_beyond_loopback_warns(tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, "-m", "vlrt", "ui", "--host", "0.0.0.0", "--port", "0"], cwd=tmp_path,
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = server.stderr.readline()
    finally:
        server.terminate()
        server.wait(30)
    assert line.startswith("vlrt: warning: listening on 0.0.0.0: anyone who can reach this address can render and read")


def test_an_ended_child_is_reaped_and_seen_ended_without_anyone_asking() -> None:
    """The page once stopped polling a render child and it sat a zombie that `Popen.poll` reported as
    running: the child's own waiter must reap it the moment it exits."""
    import os
    import time

    from vlrt.ui.runner import Child

    child = Child(["render", "no-such-input.mp4", "-o", "out.mp4", "--model", "demo"])
    pid = child.process.pid
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:  # a zombie keeps its /proc entry
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")
    assert child.wait(5) == 2 and not child.running
    assert child.error() is not None and "no-such-input.mp4" in child.error()
