"""The ONNX Runtime backend: CPU everywhere, CUDA where onnxruntime-gpu is installed.

Inputs are cast to the types the ONNX file declares (so fp16 exports work: sample and
embeddings go in as float16, the UNet timestep stays float32), outputs come back as float32
torch tensors on the engine's device, like every other backend.

On CUDA (onnxruntime-gpu) a session computes on a torch stream of its own (ORT's
`user_compute_stream`), ordered against torch's current stream with `wait_stream`, with its
buffers bound by address and no host synchronisation per call; cuDNN picks convolution
algorithms by heuristics, not by an exhaustive search of every new shape (seconds each).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vlrt.engines.base import Engine
from vlrt.errors import VlrtError

CPU = torch.device("cpu")
ORT_TYPES: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
}


def usable_cpus() -> int:
    """CPUs this process may run on: in a container ONNX Runtime's default counts the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_session(
    path: Path, device: torch.device, threads: int | None = None, stream: torch.cuda.Stream | None = None
) -> ort.InferenceSession:
    """An InferenceSession on `device` (computing on `stream` on CUDA); VlrtError for a missing or
    corrupt file or a missing provider."""
    fix = _fix(path)
    if not path.is_file():
        raise VlrtError(f"ONNX engine {path} does not exist; {fix}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    # Decoding and encoding threads share these few cores: waiting threads must sleep, not spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise VlrtError(
                "ONNX Runtime has no CUDA provider; `pip uninstall onnxruntime && pip install onnxruntime-gpu`, "
                "or run on the CPU"
            )
        cuda_options = {"device_id": str(device.index or 0), "cudnn_conv_algo_search": "HEURISTIC"}
        if stream is not None:
            cuda_options["user_compute_stream"] = str(stream.cuda_stream)
        providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VlrtError(f"cannot load ONNX engine {path} ({reason}); {fix}") from err
    if device.type == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        # ORT logs an error and silently runs on the CPU when the CUDA libraries are missing.
        raise VlrtError(
            "ONNX Runtime could not start its CUDA provider (CUDA/cuDNN libraries missing or mismatched); "
            "install the CUDA and cuDNN versions onnxruntime-gpu asks for, or run on the CPU"
        )
    return session


def run_session(
    session: ort.InferenceSession,
    feed: Mapping[str, torch.Tensor],
    device: torch.device = CPU,
    stream: torch.cuda.Stream | None = None,
) -> dict[str, torch.Tensor]:
    """Run one batch; float32 outputs on `device` (numpy on the CPU, IO binding on CUDA, where
    `stream` is the session's compute stream)."""
    if device.type == "cuda":
        return _run_bound(session, feed, device, stream)
    arrays = {
        meta.name: feed[meta.name].detach().to("cpu", ORT_TYPES[meta.type]).contiguous().numpy()
        for meta in session.get_inputs()
    }
    values = session.run(None, arrays)
    return {meta.name: torch.from_numpy(v).float() for meta, v in zip(session.get_outputs(), values, strict=True)}


_NO_SYNC = ort.RunOptions()
_NO_SYNC.add_run_config_entry("disable_synchronize_execution_providers", "1")


def _run_bound(
    session: ort.InferenceSession, feed: Mapping[str, torch.Tensor], device: torch.device, stream: torch.cuda.Stream | None
) -> dict[str, torch.Tensor]:
    """Hand torch's device buffers to ORT without copies through the host.

    With the session's own `stream`, the call is ordered on the device like a torch op; without
    one (ORT's own stream), the host waits before and after."""
    binding = session.io_binding()
    buffers = []
    for meta in session.get_inputs():
        t = feed[meta.name].detach().to(device, ORT_TYPES[meta.type]).contiguous()
        buffers.append(t)
        binding.bind_input(meta.name, "cuda", device.index or 0, _np_type(t.dtype), tuple(t.shape), t.data_ptr())
    rows = buffers[0].shape[0]
    outs = {}
    for meta in session.get_outputs():
        shape = [rows if isinstance(d, str) or d is None else d for d in meta.shape]
        out = torch.empty(shape, dtype=ORT_TYPES[meta.type], device=device)
        binding.bind_output(meta.name, "cuda", device.index or 0, _np_type(out.dtype), tuple(shape), out.data_ptr())
        outs[meta.name] = out
        buffers.append(out)
    current = torch.cuda.current_stream(device)
    if stream is None:
        current.synchronize()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
    else:
        stream.wait_stream(current)  # the inputs are ready
        for t in buffers:
            t.record_stream(stream)  # not reused by torch's allocator before ORT has run
        session.run_with_iobinding(binding, _NO_SYNC)
        current.wait_stream(stream)
    return {name: out.float() for name, out in outs.items()}


def _np_type(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


class OrtEngine(Engine):
    """One ONNX file from `vlrt export` run by ONNX Runtime."""

    backend = "ort"

    def __init__(
        self,
        component: str,
        path: Path,
        max_batch: int,
        device: torch.device,
        threads: int | None = None,
        names: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
    ) -> None:
        super().__init__(component, max_batch, device, names)
        self.path = Path(path)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.session = load_session(self.path, device, threads, self.stream)
        _check_signature(self.session, self, self.path)

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return run_session(self.session, feed, self.device, self.stream)


def _check_signature(session: ort.InferenceSession, engine: Engine, path: Path) -> None:
    """Refuse files for another component, or a UNet whose timestep would be rounded to integers."""
    fix = _fix(path)
    inputs = {m.name: m.type for m in session.get_inputs()}
    outputs = tuple(m.name for m in session.get_outputs())
    component = engine.component
    if set(inputs) != set(engine.input_names) or outputs != engine.output_names:
        raise VlrtError(
            f"ONNX engine {path} has inputs {tuple(inputs)} and outputs {outputs}, "
            f"not those of a {component} engine; {fix}"
        )
    unknown = sorted(t for t in inputs.values() if t not in ORT_TYPES)
    if unknown:
        raise VlrtError(f"ONNX engine {path} has inputs of unsupported types {unknown}; {fix}")
    if "timestep" in inputs and inputs["timestep"] != "tensor(float)":
        raise VlrtError(f"ONNX engine {path} takes an integer timestep, which fractional schedules need as float32; {fix}")


def _fix(path: Path) -> str:
    return f"delete the engine folder {path.parent} and re-run `vlrt export` (or run again: a missing engine is rebuilt)"
