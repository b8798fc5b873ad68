"""Stand-ins for `tensorrt` and `polygraphy`, for tests on machines that have neither.

They follow the documented Python API where vlrt touches it, and record what they are asked
(loggers, runtimes, builder settings). Like the real ones, TensorRT's default `Logger` and
polygraphy's `G_LOGGER` (below CRITICAL, unless told to use Python logging) print to standard
output.
"""

from __future__ import annotations

import enum
import importlib.machinery
import sys
import types
from typing import Any


def _module(name: str) -> types.ModuleType:
    """A module with a spec, as importlib's find_spec (torch._dynamo asks for tensorrt's) expects."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: Severity, msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    """TensorRT's default logger: prints with std::cout, i.e. to standard output."""

    WARNING = Severity.WARNING

    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity: Severity, msg: str) -> None:
        if severity <= self.min_severity:
            sys.stdout.write(f"[TRT] {msg}\n")
            sys.stdout.flush()


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError("Runtime() takes an ILogger")
        self.logger = logger
        FAKE.runtimes.append(self)


class _Recorder:
    def __init__(self) -> None:
        self.runtimes: list[Runtime] = []
        self.configs: list[dict[str, Any]] = []


FAKE = _Recorder()


def tensorrt_module(version: str = "10.9.0", runtime_fails: bool = False) -> types.ModuleType:
    """A fresh fake `tensorrt` of `version`; `runtime_fails` makes `Runtime()` fail as without a GPU."""
    FAKE.__init__()
    trt = _module("tensorrt")
    trt.__version__ = version
    trt.ILogger = ILogger
    trt.Logger = Logger
    if runtime_fails:
        def failing(logger: ILogger) -> Runtime:
            raise RuntimeError("CUDA initialization failure with error: 35")
        trt.Runtime = failing
    else:
        trt.Runtime = Runtime

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    trt.IProgressMonitor = IProgressMonitor
    return trt


class PolygraphyLogger:
    """polygraphy's G_LOGGER as far as vlrt uses it."""

    WARNING, INFO, CRITICAL = 30, 20, 50

    def __init__(self) -> None:
        self._python = False
        self.python_logger = None

    @property
    def use_python_logging_system(self) -> bool:
        return self._python

    @use_python_logging_system.setter
    def use_python_logging_system(self, value: bool) -> None:
        import logging

        self._python = value
        if value:
            self.python_logger = logging.getLogger("Polygraphy")

    def log(self, message: str, severity: int) -> None:
        if self._python:
            self.python_logger.log(level=severity, msg=message)
        else:
            print(message, file=sys.stdout if severity < self.CRITICAL else sys.stderr)

    def info(self, message: str) -> None:
        self.log(message, self.INFO)

    def warning(self, message: str) -> None:
        self.log(message, self.WARNING)


def polygraphy_modules(version: str = "0.53.6") -> dict[str, types.ModuleType]:
    """`polygraphy` and `polygraphy.logger`, for `sys.modules`."""
    root = _module("polygraphy")
    root.__version__ = version
    logger = _module("polygraphy.logger")
    logger.G_LOGGER = PolygraphyLogger()
    root.logger = logger
    return {"polygraphy": root, "polygraphy.logger": logger}


def install(monkeypatch: Any, version: str = "10.9.0", polygraphy: str | None = "0.53.6", runtime_fails: bool = False) -> Any:
    """Put the fakes into sys.modules (polygraphy None: not installed) and pretend a CUDA GPU is visible."""
    import torch

    trt = tensorrt_module(version, runtime_fails)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if polygraphy is None:
        monkeypatch.setitem(sys.modules, "polygraphy", None)  # import raises ImportError
    else:
        for name, module in polygraphy_modules(polygraphy).items():
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return trt


def polygraphy_trt_backend(monkeypatch: Any) -> list[dict[str, Any]]:
    """A fake `polygraphy.backend.trt` whose builds record their settings and write a small plan."""
    configs: list[dict[str, Any]] = []

    class Profile(dict):
        def add(self, name: str, min: tuple, opt: tuple, max: tuple) -> Profile:  # noqa: A002 (polygraphy's names)
            self[name] = (min, opt, max)
            return self

    def create_config(**kwargs: Any) -> dict[str, Any]:
        configs.append(kwargs)
        return kwargs

    def network_from_onnx_path(path: str, strongly_typed: bool = False) -> dict[str, Any]:
        return {"path": path, "strongly_typed": strongly_typed}

    def engine_bytes_from_network(network: dict[str, Any], config: dict[str, Any], save_timing_cache: str | None = None) -> bytes:
        config.update(network=network, save_timing_cache=save_timing_cache)
        return b"plan"

    backend = _module("polygraphy.backend")
    module = _module("polygraphy.backend.trt")
    module.Profile, module.CreateConfig = Profile, create_config
    module.NetworkFromOnnxPath, module.engine_bytes_from_network = network_from_onnx_path, engine_bytes_from_network
    backend.trt = module
    monkeypatch.setitem(sys.modules, "polygraphy.backend", backend)
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", module)
    return configs
