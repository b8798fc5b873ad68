"""TensorRT plans from the fp16 ONNX export, with polygraphy (TensorRT 10/11 practice).

- Strongly typed: the ONNX is already fp16 (timestep float32), and TensorRT 11 dropped the
  weak-typing precision flags; the types in the file are the types the plan computes in.
- One optimization profile: the resolution and prompt length as exported (static: dynamic
  shapes make TensorRT several times slower), the batch from 1 to max_batch, tuned at max_batch
  because the executor fills batches.
- An optional timing cache shared across builds makes rebuilds (another batch size, another
  model of the same architecture) much faster.
- The UNet is built refittable, so a LoRA change refits weights instead of rebuilding; except
  on TensorRT 11.3, whose refittable builds can compute wrong results (NVIDIA's 11.3.0 docs):
  there it is built without REFIT, and a LoRA change rebuilds it.

Builds take minutes; TensorRT's phases are logged as they start and end.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import onnx

from vlrt.engines.base import UNET, UNET_CONTROL
from vlrt.engines.trt_engine import refit_supported, require_trt
from vlrt.errors import VlrtError
from vlrt.export.onnx_export import progress

log = logging.getLogger(__name__)


def profile_shapes(onnx_path: Path, max_batch: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input: batch 1 / max_batch / max_batch, other axes as exported."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    shapes = {}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        rest = tuple(d.dim_value for d in dims[1:])
        if not dims or not dims[0].dim_param or any(d.dim_param for d in dims[1:]):
            raise ValueError(f"{onnx_path}: input {value.name} must have a dynamic batch axis and static others")
        shapes[value.name] = ((1, *rest), (max_batch, *rest), (max_batch, *rest))
    return shapes


def build_plan(
    component: str,
    onnx_path: Path,
    plan_path: Path,
    *,
    max_batch: int,
    timing_cache: Path | None = None,
) -> None:
    """Build a strongly typed plan for batch 1..max_batch from `onnx_path` into `plan_path`.

    The UNet's plan is refittable (see the module docstring); the others are not, which
    leaves TensorRT free to fold their weights. `timing_cache` is read when it exists and
    written after the build.
    """
    trt = require_trt()
    try:
        from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile, engine_bytes_from_network
    except ImportError as err:
        raise VlrtError(f"building TensorRT plans needs polygraphy ({err}); `pip install polygraphy`") from err

    profile = Profile()
    for name, (lo, opt, hi) in profile_shapes(onnx_path, max_batch).items():
        profile.add(name, min=lo, opt=opt, max=hi)
    unet = component in (UNET, UNET_CONTROL)  # a LoRA change refits the UNet, with or without ControlNet inputs
    refittable = unet and refit_supported(trt.__version__)
    if unet and not refittable:
        log.warning("TensorRT %s: building the UNet plan without REFIT (refittable plans may compute wrong results "
                    "on 11.3); a LoRA change rebuilds it", trt.__version__)
    config = CreateConfig(
        profiles=[profile],
        refittable=refittable,
        load_timing_cache=str(timing_cache) if timing_cache is not None and timing_cache.is_file() else None,
        progress_monitor=_progress_monitor(trt),
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    with progress(f"building TensorRT plan {plan_path.name} from {onnx_path.name} (batch 1..{max_batch})"):
        plan = engine_bytes_from_network(
            network, config=config, save_timing_cache=str(timing_cache) if timing_cache is not None else None
        )
    with open(plan_path, "wb") as handle:
        handle.write(plan)


def _progress_monitor(trt: Any) -> Any:
    """A TensorRT progress monitor that logs top-level build phases (it must be thread-safe)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._top: set[str] = set()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                with self._lock:
                    self._top.add(phase_name)
                log.info("TensorRT: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                top = phase_name in self._top
                self._top.discard(phase_name)
            if top:
                log.info("TensorRT: %s finished", phase_name)

    return Monitor()
