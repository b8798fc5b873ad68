"""The README is the user's manual: every command and option it names exists, and a test or `make demo` drives it."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlrt.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Options of other programs the README shows (pip, ray start, tools/gpu_check.sh, tested in
# test_gpu_check.py), and words that only look like options: the naming rule for options and the
# prompt files' separator.
FOREIGN = {"--index-url", "--extra-index-url", "--head", "--address", "--help", "--kebab-case", "--neg",
           "--dry-run", "--out", "--backends"}


def _readme_options() -> set[str]:
    found = set()
    for line in README.splitlines():
        if "pip install" in line or "make setup" in line:
            continue
        found.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    return found - FOREIGN


def _readme_commands() -> set[str]:
    return set(re.findall(r"\bvlrt (render|preview|export|denoise|report|doctor|bench)\b", README))


def _parser_options() -> dict[str, set[str]]:
    """Each subcommand's option strings."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def _exercised() -> str:
    """Everything that drives vlrt: the tests and `make demo` with its preset."""
    texts = [p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("*.py") if p.name != "test_readme.py"]
    texts += [(ROOT / "Makefile").read_text(), *(p.read_text() for p in (ROOT / "presets").glob("*.toml"))]
    return "\n".join(texts)


def test_every_readme_option_is_an_option_of_vlrt():
    known = set().union(*_parser_options().values())
    assert _readme_options() - known == set()
    assert {"render", "preview", "export", "denoise", "report", "doctor", "bench"} <= _readme_commands()


def test_every_readme_command_and_option_is_driven_by_a_test_or_the_demo():
    corpus = _exercised()
    untested = []
    for option in sorted(_readme_options()):
        name = option[2:].removeprefix("no-").replace("-", "_")
        if not any(form in corpus for form in (f'"{option}"', f"'{option}'", f"{name}=", f'"{name}"', f"{name} =")):
            untested.append(option)
    assert untested == []
    for command in _readme_commands():
        assert f'"{command}"' in corpus or f"vlrt {command}" in corpus, command


def test_every_setting_is_in_the_readme_parameter_table():
    from dataclasses import fields

    from vlrt.settings.config import Settings

    table = "\n".join(line for line in README.splitlines() if line.startswith("| `"))
    assert [f.name for f in fields(Settings) if f"`{f.name}`" not in table] == []


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg and ffprobe programs (.ci/run installs them)")
def test_readme_pipe_example_runs_as_written_and_makes_a_playable_mp4(tmp_path):
    """The README's pipe line through the shell as written, only the model swapped for the demo
    with one short pass: ffprobe must find 4 frames of yuv420p H.264 (High profile, which every
    player decodes), not the High 4:4:4 that an RGB stream becomes without -pix_fmt."""
    (line,) = [text for text in README.splitlines() if text.startswith("ffmpeg -i cam.mkv")]
    command = line.replace("--model ./sd15", "--model demo --loop-n 1 --steps 2")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=24", "-frames:v", "4",
                    "cam.mkv"], cwd=tmp_path, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, check=True, env=env, capture_output=True)
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=codec_name,profile,pix_fmt,nb_read_frames", "-of", "json", "out.mp4"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    )
    (stream,) = json.loads(probe.stdout)["streams"]
    assert (stream["codec_name"], stream["pix_fmt"], stream["profile"], stream["nb_read_frames"]) == ("h264", "yuv420p", "High", "4")
