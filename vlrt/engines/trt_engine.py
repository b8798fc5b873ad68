"""The TensorRT backend: runs a plan built by `vlrt.export.trt_build` (TensorRT 10/11 API).

`tensorrt` is imported only when a plan is loaded or refitted, so vlrt imports and runs
without it. Input and output buffers are torch CUDA tensors handed to TensorRT by address
(`set_tensor_address`), and the plan runs on torch's current stream (`execute_async_v3`), so
no copies and no synchronisation are needed between torch and TensorRT.

The UNet plan is built refittable: a LoRA change replaces its weights (`refit`) in seconds
instead of a rebuild that takes minutes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlrt.engines.base import Engine
from vlrt.errors import VlrtError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install TensorRT with `pip install tensorrt` (its libraries come from NVIDIA's index, "
    "https://pypi.nvidia.com) on a machine with an NVIDIA GPU and a CUDA build of torch, "
    "or use --backend ort"
)

Weights = Path | Mapping[str, np.ndarray]  # an ONNX file of the same network, or initializer name -> array


def trt_available() -> tuple[bool, str]:
    """Whether TensorRT plans can run here, and if not why and how to fix it."""
    reasons = []
    try:
        import tensorrt as trt
    except (ImportError, OSError) as err:  # OSError: a wheel whose shared libraries are missing
        reasons.append(f"the tensorrt module cannot be imported ({err})")
        trt = None
    if not torch.cuda.is_available():
        reasons.append("torch sees no CUDA GPU")
    if reasons:
        return False, "; ".join(reasons) + "; " + INSTALL_HINT
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def require_trt() -> Any:
    """The tensorrt module, or a VlrtError saying why it cannot be used and how to fix that."""
    ok, why = trt_available()
    if not ok:
        raise VlrtError(f"the TensorRT backend is unavailable: {why}")
    import tensorrt as trt

    return trt


_LOGGER = None


def trt_logger() -> Any:
    """One TensorRT logger for the process (TensorRT wants it to outlive every object using it)."""
    global _LOGGER
    if _LOGGER is None:
        trt = require_trt()
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
    }
    return table[dtype]


def load_plan(path: Path) -> Any:
    """Deserialize a plan; VlrtError when it is corrupt or was built for another TensorRT or GPU."""
    trt = require_trt()
    if not path.is_file():
        raise VlrtError(f"TensorRT plan {path} does not exist; re-run `vlrt export`")
    engine = trt.Runtime(trt_logger()).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise VlrtError(
            f"TensorRT cannot load the plan {path} (corrupt, or built by another TensorRT version or for "
            f"another GPU); delete the engine folder {path.parent} and re-run `vlrt export`"
        )
    return engine


class TrtEngine(Engine):
    """One TensorRT plan with one optimization profile (batch 1..max_batch, static resolution)."""

    backend = "trt"

    def __init__(
        self,
        component: str,
        path: Path,
        max_batch: int,
        device: torch.device,
        names: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
    ) -> None:
        super().__init__(component, max_batch, device, names)
        if device.type != "cuda":
            raise VlrtError(f"TensorRT runs on CUDA devices only, not {device}; use --backend ort")
        self.path = Path(path)
        self._trt = require_trt()
        with torch.cuda.device(device):
            self.engine = load_plan(self.path)
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self._trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _torch_dtype(self._trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._check_signature()

    def _check_signature(self) -> None:
        fix = f"delete the engine folder {self.path.parent} and re-run `vlrt export`"
        if set(self.inputs) != set(self.input_names) or tuple(self.outputs) != self.output_names:
            raise VlrtError(f"TensorRT plan {self.path} is not a {self.component} engine; {fix}")
        if "timestep" in self.dtypes and self.dtypes["timestep"] != torch.float32:
            raise VlrtError(f"TensorRT plan {self.path} takes a non-float32 timestep; {fix}")
        top = self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0]
        if top < self.max_batch:
            raise VlrtError(f"TensorRT plan {self.path} takes at most {top} rows, not {self.max_batch}; {fix}")

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context = self.context
        keep = []  # inputs live until the stream has run: the allocator reuses memory in stream order
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            for name in self.inputs:
                t = feed[name].to(self.device, self.dtypes[name]).contiguous()
                keep.append(t)
                if not context.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"{name} of shape {tuple(t.shape)} is outside the profile of {self.path}")
                context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.outputs:
                out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
                context.set_tensor_address(name, out.data_ptr())
                outs[name] = out
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path}; see its log above")
        return {name: out.float() for name, out in outs.items()}

    def refit(self, weights: Weights) -> None:
        """Replace the weights of this (refittable) plan in memory, e.g. after merging a LoRA."""
        torch.cuda.current_stream(self.device).synchronize()  # no run may use the old weights
        with torch.cuda.device(self.device):
            refit_engine(self.engine, weights)


def refit_engine(engine: Any, weights: Weights) -> None:
    """Refit a deserialized plan from an ONNX file of the same network or named arrays."""
    trt = require_trt()
    if not engine.refittable:
        raise VlrtError("this TensorRT plan was not built refittable; rebuild it (only UNet plans are refittable)")
    refitter = trt.Refitter(engine, trt_logger())
    if isinstance(weights, Path):
        parser = trt.OnnxParserRefitter(refitter, trt_logger())
        if not parser.refit_from_file(str(weights)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise VlrtError(f"cannot refit from {weights}: {errors or 'not the same network'}")
    else:
        # An ONNX file's initializers include constants TensorRT folded away (shapes, axes): skip
        # names the plan does not hold as weights, but refuse a mapping that matches none.
        held = set(refitter.get_all_weights())
        arrays = {n: np.ascontiguousarray(a) for n, a in weights.items() if n in held}  # alive until the refit
        if not arrays:
            raise VlrtError("none of the given arrays names a weight of this plan; give ONNX initializer names")
        log.info("refitting %d weights (%d other arrays are not weights of the plan)", len(arrays), len(weights) - len(arrays))
        for name, array in arrays.items():
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise VlrtError(f"cannot refit weight {name!r}: it has another shape or dtype in the plan")
    missing = refitter.get_missing_weights()
    if missing:
        raise VlrtError(f"refit is missing {len(missing)} weights, e.g. {list(missing)[:3]}; give all of them")
    if not refitter.refit_cuda_engine():
        raise VlrtError("TensorRT failed to refit the engine; see its log above")


def refit_unet(plan: Path, weights: Weights, out: Path) -> None:
    """Write to `out` the plan `plan` with new weights (say, the UNet with a LoRA merged).

    `out` must differ from `plan`: a cache entry's manifest names the weights its plan was
    built from, and overwriting them would make a later run load the wrong weights.
    """
    if Path(out).resolve() == Path(plan).resolve():
        raise ValueError("refit_unet writes a new plan; give an output path other than the input plan")
    engine = load_plan(Path(plan))
    refit_engine(engine, weights)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(engine.serialize())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("refitted %s into %s", plan, out)
