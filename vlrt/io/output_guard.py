"""Refusing an output that would replace what a run reads, or (on request) anything already there.

A render replaces its output only at the end, so `vlrt render same.mp4 -o same.mp4` would read
the whole source and then destroy it. These checks run before any work: the same file is found
by resolved path (symlinks, `./`, `..`) and by inode (hard links, case-insensitive file systems).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from vlrt.errors import VlrtError

# What a folder output writes into its folder (PngFolderSink's frames, the settings file).
_FOLDER_OUTPUT_NAME = re.compile(r"^(\d{6}\.png|settings\.toml)$")


def same_path(a: Path, b: Path) -> bool:
    """True when `a` and `b` name the same file or folder (by resolved path, or by inode when both exist)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _clash(output: Path, folder_output: bool, source: Path) -> bool:
    if same_path(output, source):
        return True
    # A folder output writes 000000.png … and settings.toml: a source file of such a name in it would be replaced.
    return folder_output and source.is_file() and bool(_FOLDER_OUTPUT_NAME.match(source.name)) and same_path(source.parent, output)


def refuse_overwriting_sources(outputs: Iterable[tuple[str, bool]], sources: Iterable[tuple[str, str]]) -> None:
    """Refuse when an output (spec, is-folder) would replace a source (what, path): the same file,
    the same folder, or a folder output that holds a source under a name it writes."""
    named = [(what, Path(spec)) for what, spec in sources if spec and spec != "-"]
    for spec, folder in outputs:
        if spec == "-":
            continue
        for what, source in named:
            if _clash(Path(spec), folder, source):
                raise VlrtError(
                    f"output '{spec}' is the {what} '{source}': rendering would replace it; "
                    "choose another output path"
                )


def refuse_existing(paths: Iterable[tuple[str, bool]]) -> None:
    """--no-overwrite: refuse when a file the run writes exists already (for a folder, a frame or
    settings file in it)."""
    for spec, folder in paths:
        if spec == "-":
            continue
        path = Path(spec)
        taken = (
            [p for p in path.iterdir() if _FOLDER_OUTPUT_NAME.match(p.name)] if folder and path.is_dir()
            else [path] if path.exists() and not folder else []
        )
        if taken:
            raise VlrtError(
                f"'{sorted(taken)[0]}' exists and --no-overwrite was given: choose another output path, "
                "or drop --no-overwrite to replace it"
            )
