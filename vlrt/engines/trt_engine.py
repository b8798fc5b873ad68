"""The TensorRT backend: runs a plan built by `vlrt.export.trt_build` (TensorRT 10/11 API).

`tensorrt` is imported only when a plan is loaded or refitted, so vlrt imports and runs
without it. Input and output buffers are torch CUDA tensors handed to TensorRT by address
(`set_tensor_address`), so no copies are made between torch and TensorRT.

- Standard output may carry the video (`-o -`): TensorRT's own logger prints there, and so does
  polygraphy's below CRITICAL, so every TensorRT message goes through an `ILogger` subclass into
  Python logging (`vlrt.tensorrt`) and polygraphy's into `vlrt.polygraphy`, both on standard error.
- The plans of a device run on one stream of their own, never torch's legacy default stream (on
  which TensorRT may synchronise the device every call); torch's current stream and it wait for
  each other (`wait_stream`), and every buffer a plan reads or writes is `record_stream`-ed.
- Plans run one after another on that stream, so they share one activation buffer, sized for the
  largest (`ExecutionContextAllocationStrategy.USER_MANAGED`), instead of one buffer each.
- The UNet plan is built refittable, so a LoRA change replaces its weights (`refit`) in seconds
  instead of a rebuild that takes minutes; except on TensorRT 11.3, whose refittable builds can
  compute wrong results (NVIDIA's 11.3.0 documentation): there a LoRA change rebuilds.
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
trt_log = logging.getLogger("vlrt.tensorrt")
polygraphy_log = logging.getLogger("vlrt.polygraphy")
polygraphy_log.setLevel(logging.WARNING)  # its INFO lines narrate every build step

NVIDIA_INDEX = "https://pypi.nvidia.com"
POLYGRAPHY_MIN = (0, 49, 1)

Weights = Path | Mapping[str, np.ndarray]  # an ONNX file of the same network, or initializer name -> array


def install_command() -> str:
    """The pip command for TensorRT's wheel of torch's CUDA major version (tensorrt-cu12, tensorrt-cu13)."""
    cuda = getattr(torch.version, "cuda", None)
    package = f"tensorrt-cu{cuda.split('.')[0]}" if cuda else "tensorrt-cu12"
    return f"pip install {package} polygraphy --extra-index-url {NVIDIA_INDEX}"


def install_hint() -> str:
    """How to get TensorRT, in one sentence ending with the way around it."""
    first = "" if getattr(torch.version, "cuda", None) else "a CUDA build of torch (see the README), then "
    return f"install {first}TensorRT with `{install_command()}` on a machine with an NVIDIA GPU, or use --backend ort"


def polygraphy_problem() -> str | None:
    """Why the installed polygraphy cannot build plans (missing, or older than 0.49.1), or None."""
    try:
        import polygraphy
    except ImportError:
        return "polygraphy is not installed (it builds the plans)"
    version = getattr(polygraphy, "__version__", "0")
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if parts < POLYGRAPHY_MIN:
        return f"polygraphy {version} is older than {'.'.join(map(str, POLYGRAPHY_MIN))}"
    return None


def trt_available() -> tuple[bool, str]:
    """Whether TensorRT plans can be built and run here (it imports, a CUDA GPU is visible, a
    `trt.Runtime` starts, polygraphy is recent enough), and if not why and how to fix it."""
    reasons = []
    try:
        import tensorrt as trt
    except (ImportError, OSError) as err:  # OSError: a wheel whose shared libraries are missing
        reasons.append(f"the tensorrt module cannot be imported ({_first_line(err)})")
        trt = None
    if not torch.cuda.is_available():
        reasons.append("torch sees no CUDA GPU")
    elif trt is not None:
        problem = runtime_problem(trt)
        if problem is not None:
            reasons.append(problem)
    problem = polygraphy_problem()
    if problem is not None:
        reasons.append(problem)
    if reasons:
        return False, "; ".join(reasons) + "; " + install_hint()
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def runtime_problem(trt: Any) -> str | None:
    """Why TensorRT cannot start here (a CUDA initialisation error, say), or None: importing it proves little."""
    try:
        runtime = trt.Runtime(trt_logger())
    except Exception as err:  # TensorRT raises its own pybind types
        return f"TensorRT cannot start a runtime ({_first_line(err)})"
    return None if runtime is not None else "TensorRT cannot start a runtime (see its log above)"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def require_trt() -> Any:
    """The tensorrt module, or a VlrtError saying why it cannot be used and how to fix that."""
    ok, why = trt_available()
    if not ok:
        raise VlrtError(f"the TensorRT backend is unavailable: {why}")
    import tensorrt as trt

    return trt


def refit_supported(version: str) -> bool:
    """False on TensorRT 11.3.x, whose refittable builds may give wrong results (NVIDIA's 11.3.0 docs)."""
    return tuple(version.split(".")[:2]) != ("11", "3")


_LOGGER: tuple[Any, Any] | None = None  # (the tensorrt module, its logger)


def trt_logger() -> Any:
    """One TensorRT logger for the process (TensorRT wants it to outlive every object using it):
    an `ILogger` into Python logging, never TensorRT's default one, which prints to standard output.
    Also routes polygraphy's messages into logging."""
    global _LOGGER
    import tensorrt as trt

    if _LOGGER is None or _LOGGER[0] is not trt:
        _LOGGER = (trt, _logging_logger(trt))
    route_polygraphy_logs()
    return _LOGGER[1]


def _logging_logger(trt: Any) -> Any:
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.CRITICAL,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,  # TensorRT's INFO is a build's chatter
        severity.VERBOSE: logging.DEBUG,
    }

    class ToLogging(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            trt_log.log(levels.get(severity, logging.WARNING), "TensorRT: %s", msg)

    return ToLogging()


def route_polygraphy_logs() -> None:
    """Send polygraphy's messages to Python logging: it prints those below CRITICAL to standard output."""
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return
    G_LOGGER.use_python_logging_system = True
    G_LOGGER.python_logger = polygraphy_log  # in place of its own "Polygraphy" logger, under vlrt's handler


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


_RUNTIMES: list[Any] = []  # a runtime must outlive the engines it deserialized


def load_plan(path: Path) -> Any:
    """Deserialize a plan; VlrtError when it is corrupt or was built for another TensorRT or GPU."""
    trt = require_trt()
    if not path.is_file():
        raise VlrtError(f"TensorRT plan {path} does not exist; re-run `vlrt export`")
    runtime = trt.Runtime(trt_logger())
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise VlrtError(
            f"TensorRT cannot load the plan {path} (corrupt, or built by another TensorRT version or for "
            f"another GPU); delete the engine folder {path.parent} and re-run `vlrt export`"
        )
    _RUNTIMES.append(runtime)
    return engine


class _DeviceShare:
    """What the plans of one device share: their stream, and one activation buffer for the largest."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.memory = torch.empty(0, dtype=torch.uint8, device=device)

    def activations(self, size: int) -> torch.Tensor:
        if self.memory.numel() < size:
            self.memory = torch.empty(size, dtype=torch.uint8, device=self.memory.device)
        return self.memory


_SHARES: dict[torch.device, _DeviceShare] = {}


def _share(device: torch.device) -> _DeviceShare:
    if device not in _SHARES:
        _SHARES[device] = _DeviceShare(device)
    return _SHARES[device]


def _context_without_memory(trt: Any, engine: Any) -> tuple[Any, int]:
    """An execution context whose activation memory vlrt provides, and that memory's size in bytes."""
    if hasattr(trt, "ExecutionContextAllocationStrategy"):  # TensorRT 10 and later
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    else:
        context = engine.create_execution_context_without_device_memory()
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT 10.1 and later
    return context, int(engine.device_memory_size if size is None else size)


def _set_memory(context: Any, memory: torch.Tensor, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT 10.1 and later
        context.set_device_memory(memory.data_ptr(), size)
    else:
        context.device_memory = memory.data_ptr()


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
            self.context, self.memory_size = _context_without_memory(self._trt, self.engine)
            self.share = _share(device)
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
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            buffers = []  # made on torch's stream, used on the plans' stream
            for name in self.inputs:
                t = feed[name].to(self.device, self.dtypes[name]).contiguous()
                buffers.append(t)
                if not context.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"{name} of shape {tuple(t.shape)} is outside the profile of {self.path}")
                context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.outputs:
                out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
                context.set_tensor_address(name, out.data_ptr())
                outs[name] = out
                buffers.append(out)
            memory = self.share.activations(self.memory_size)
            _set_memory(context, memory, self.memory_size)
            stream = self.share.stream
            stream.wait_stream(current)  # the inputs are ready
            for t in (*buffers, memory):
                t.record_stream(stream)  # not reused by torch's allocator before the plan has run
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path}; see its log above")
            current.wait_stream(stream)  # the outputs are ready for what torch does next
        return {name: out.float() for name, out in outs.items()}

    def refit(self, weights: Weights) -> None:
        """Replace the weights of this (refittable) plan in memory, e.g. after merging a LoRA."""
        self.share.stream.synchronize()  # no run may use the old weights
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
