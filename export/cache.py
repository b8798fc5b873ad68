"""The engine cache: one folder per (weights, component, resolution, prompt length, max batch, precision).

Layout (`root` is `engines/` by default)::

    <root>/<model_hash[:12]>-<component>-<H>x<W>[-t<tokens>]-b<max_batch>-<precision>/
        model.onnx
        model.onnx.data     ONNX external data, for models over 2 GB
        model.plan          TensorRT plan, where one was asked for
        manifest.json       written last: an entry without one is incomplete

Crash safety: a folder is built under a hidden temporary name (`.<name>.tmp-<pid>`) and renamed
into place only once its manifest is written, so a crash never leaves a folder that looks
complete. A plan rebuilt for another TensorRT version or GPU is written beside the ONNX under a
temporary name and moved into place before the manifest is updated. Leftovers of crashed
builds are removed by the next build of the same entry.

A folder is used only when its manifest matches the key (see `manifest.py`) and every file
has the size the manifest recorded; otherwise it is rebuilt. A file that has the right size
but corrupt contents is not detected here (that would mean hashing gigabytes at every start):
loading it raises a VlrtError naming the file and telling the user to delete the folder.

Concurrent processes building the same entry take turns through an advisory lock file
(`.<name>.lock`, POSIX `flock`), so the second one finds the first one's result.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vlrt.export.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    PLAN_FILE,
    EngineKey,
    onnx_mismatch,
    plan_mismatch,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

BuildOnnx = Callable[[Path], None]  # writes model.onnx (and model.onnx.data) into the given folder
BuildPlan = Callable[[Path, Path], None]  # (onnx path, plan path to write)


class EngineCache:
    """Finds complete, matching engine folders under `root`, or builds them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, component: str, key: EngineKey) -> Path:
        return self.root / key.folder_name(component)

    def find(self, component: str, key: EngineKey) -> Path | None:
        """The folder for `key` if it is complete and matches, else None."""
        folder = self.folder(component, key)
        return folder if self._why_not(folder, component, key) is None else None

    def find_same_structure(self, component: str, key: EngineKey) -> Path | None:
        """A complete entry for `key` in all but the weight values (same `structure_hash`), or None.

        Its ONNX graph is the one `key`'s export would have, so it can be re-weighted instead
        (another LoRA scale) rather than traced again.
        """
        if not key.structure_hash or not self.root.is_dir():
            return None
        for folder in sorted(self.root.iterdir()):
            manifest = None if folder.name.startswith(".") else read_manifest(folder)
            if manifest is None or manifest.get("structure_hash") != key.structure_hash:
                continue
            like = dataclasses.replace(key, model_hash=str(manifest.get("model_hash")), trt=None)
            if manifest.get("model_hash") != key.model_hash and onnx_mismatch(manifest, component, like, folder) is None:
                return folder
        return None

    def find_or_build(
        self, component: str, key: EngineKey, build_fn: BuildOnnx, build_plan: BuildPlan | None = None
    ) -> Path:
        """The folder for `key`, building what is missing or stale.

        `build_fn(folder)` writes `model.onnx` into a fresh temporary folder. When `key.trt` is
        set, `build_plan(onnx_path, plan_path)` builds the TensorRT plan; if only the plan is
        stale (another TensorRT version or GPU), only the plan is rebuilt.
        """
        if key.trt is not None and build_plan is None:
            raise ValueError("a key with a TensorRT target needs build_plan")
        folder = self.folder(component, key)
        if self._why_not(folder, component, key) is None:
            return folder
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock(folder):
            why = self._why_not(folder, component, key)  # another process may have built it meanwhile
            if why is None:
                return folder
            log.info("engine %s: %s; building it", folder.name, why)
            manifest = read_manifest(folder)
            self._sweep(folder)
            if key.trt is not None and manifest is not None and onnx_mismatch(manifest, component, key, folder) is None:
                self._rebuild_plan(folder, component, key, build_plan)
            else:
                self._build(folder, component, key, build_fn, build_plan)
        return folder

    def _why_not(self, folder: Path, component: str, key: EngineKey) -> str | None:
        manifest = read_manifest(folder)
        if manifest is None:
            return "it is missing or incomplete (no readable manifest)"
        why = onnx_mismatch(manifest, component, key, folder)
        if why is None and key.trt is not None:
            why = plan_mismatch(manifest, key, folder)
        return why

    def _build(
        self, folder: Path, component: str, key: EngineKey, build_fn: BuildOnnx, build_plan: BuildPlan | None
    ) -> None:
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        try:
            build_fn(tmp)
            if not (tmp / ONNX_FILE).is_file():
                raise RuntimeError(f"the ONNX build wrote no {ONNX_FILE} into {tmp}")
            if key.trt is not None:
                build_plan(tmp / ONNX_FILE, tmp / PLAN_FILE)
            write_manifest(tmp, component, key)
            if folder.exists():
                os.rename(folder, folder.with_name(f".{folder.name}.stale-{os.getpid()}"))
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._sweep(folder)

    def _rebuild_plan(self, folder: Path, component: str, key: EngineKey, build_plan: BuildPlan) -> None:
        tmp = folder / f".{PLAN_FILE}.tmp-{os.getpid()}"
        try:
            build_plan(folder / ONNX_FILE, tmp)
            os.replace(tmp, folder / PLAN_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        write_manifest(folder, component, key)

    def _sweep(self, folder: Path) -> None:
        """Remove what crashed builds of this entry left behind (called with the lock held)."""
        for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.stale-*"):
            for leftover in folder.parent.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        if folder.is_dir():
            for pattern in (f".{PLAN_FILE}.tmp-*", f".{MANIFEST_FILE}.tmp-*"):
                for leftover in folder.glob(pattern):
                    leftover.unlink(missing_ok=True)

    @contextmanager
    def _lock(self, folder: Path) -> Iterator[None]:
        with open(folder.with_name(f".{folder.name}.lock"), "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building %s", folder.name)
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield
