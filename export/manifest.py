"""The engine cache key and `manifest.json`: what an engine folder was built from and for.

Engines silently break across TensorRT versions and GPUs, and an engine built for another
resolution fails with wrong shapes (ANCHORS.md), so the key holds everything an engine depends
on: the weights (`model_hash`), the component, the static resolution, the UNet's static prompt
length (77 tokens per chunk), the batch profile 1..max_batch, the precision, the ONNX opset,
exporter and library versions, and for TensorRT plans the TensorRT version and the GPU (name and
compute capability). An entry that differs in any of these is never loaded; `EngineCache`
rebuilds it. The manifest also records `structure_hash` (the weights' names, shapes and dtypes
and the configs, not their values): entries that differ only in weight values (another LoRA
scale) share one graph, so one can be re-weighted from the other (`reweight.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from vlrt.engines.ort_engine import usable_cpus

FORMAT = 3  # bump when the export code changes what it writes, so old entries are rebuilt
EXPORTER = "torch.onnx.export(dynamo=False)"
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
PLAN_FILE = "model.plan"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose change can change an exported or loaded ONNX file."""
    import diffusers
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "diffusers": diffusers.__version__,
    }


@dataclass(frozen=True)
class TrtTarget:
    """What a TensorRT plan is only valid for: plans do not move across versions or GPUs."""

    tensorrt: str
    gpu: str
    compute_capability: str

    @classmethod
    def current(cls, device: torch.device) -> TrtTarget:
        """The running TensorRT and the GPU `device`; needs TensorRT and CUDA (see trt_available)."""
        import tensorrt as trt

        major, minor = torch.cuda.get_device_capability(device)
        return cls(trt.__version__, torch.cuda.get_device_name(device), f"{major}.{minor}")


@dataclass(frozen=True)
class EngineKey:
    """What is asked of one engine folder, component aside (one key serves all components)."""

    model_hash: str
    height: int  # static image resolution, in pixels
    width: int
    max_batch: int
    precision: str  # "fp32" or "fp16"
    tokens: int | None = None  # the UNet's static prompt length (77 per chunk); None for the VAE
    structure_hash: str = ""  # recorded, so that an entry of the same graph can be re-weighted
    opset: int = 17
    versions: dict[str, str] = field(default_factory=library_versions, hash=False)
    trt: TrtTarget | None = None  # set when a TensorRT plan is wanted too

    def folder_name(self, component: str) -> str:
        tokens = f"-t{self.tokens}" if self.tokens is not None else ""
        return f"{self.model_hash[:12]}-{component}-{self.height}x{self.width}{tokens}-b{self.max_batch}-{self.precision}"

    def onnx_record(self, component: str) -> dict[str, Any]:
        """The manifest fields an ONNX file must have to be loaded for this key."""
        return {
            "format": FORMAT,
            "component": component,
            "model_hash": self.model_hash,
            "resolution": {"height": self.height, "width": self.width},
            "tokens": self.tokens,
            "structure_hash": self.structure_hash,
            "batch": {"min": 1, "max": self.max_batch},
            "precision": self.precision,
            "opset": self.opset,
            "exporter": EXPORTER,
            "versions": dict(self.versions),
        }


def model_hash(module: nn.Module) -> str:
    """sha256 of every weight (sorted by name, with dtype and shape) and of the diffusers configs.

    All the weights, not a sample: merging a LoRA changes some layers only, and a hash that
    skipped them would load a stale engine. Hashing runs in threads (hashlib releases the GIL)
    at about 1.4 GB/s per core: the fp32 SD 1.5 UNet (3.4 GB) took 4.6 s on a busy 2-core machine.
    Configs count because some settings (SD 2's `upcast_attention`) change the computation
    without changing any weight; their private keys (`_name_or_path`, versions) do not count.
    """
    state = module.state_dict()
    names = sorted(state)

    def digest(name: str) -> bytes:
        t = state[name].detach()
        h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        return h.digest()

    total = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        for d in pool.map(digest, names):
            total.update(d)
    _hash_configs(module, total)
    return total.hexdigest()


def structure_hash(module: nn.Module) -> str:
    """sha256 of the weights' names, dtypes and shapes and of the configs, not of the values.

    Two modules with the same structure hash trace to the same ONNX graph up to initializer
    values (a model with a LoRA fused at two scales), so one export can be re-weighted into the other.
    """
    total = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        total.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    _hash_configs(module, total)
    return total.hexdigest()


def _hash_configs(module: nn.Module, total: Any) -> None:
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if isinstance(config, dict):
            public = {k: v for k, v in config.items() if not k.startswith("_")}
            total.update(json.dumps(public, sort_keys=True, default=str).encode())


def io_specs(onnx_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Names, dtypes and shapes ('batch' for the dynamic axis) of an ONNX file's inputs and outputs."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def spec(value: onnx.ValueInfoProto) -> dict[str, Any]:
        t = value.type.tensor_type
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
        }

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def file_sizes(folder: Path, names: tuple[str, ...]) -> dict[str, int]:
    """Sizes of those of `names` present in `folder`: a truncated copy then does not match."""
    return {n: (folder / n).stat().st_size for n in names if (folder / n).is_file()}


def write_manifest(folder: Path, component: str, key: EngineKey) -> dict[str, Any]:
    """Describe the files in `folder`; written last and atomically, so it marks a complete entry."""
    inputs, outputs = io_specs(folder / ONNX_FILE)
    manifest = key.onnx_record(component) | {
        "inputs": inputs,
        "outputs": outputs,
        "files": file_sizes(folder, (ONNX_FILE, ONNX_DATA_FILE)),
        "tensorrt": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if key.trt is not None and (folder / PLAN_FILE).is_file():
        manifest["tensorrt"] = asdict(key.trt) | {"files": file_sizes(folder, (PLAN_FILE,))}
    tmp = folder / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST_FILE)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest, or None when it is missing or unreadable (the entry is then incomplete)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def onnx_mismatch(manifest: dict[str, Any], component: str, key: EngineKey, folder: Path) -> str | None:
    """Why the entry's ONNX file may not be used for `key` (None: it may)."""
    for name, want in key.onnx_record(component).items():
        have = manifest.get(name)
        if have != want:
            return f"{name} is {have}, wanted {want}"
    if manifest.get("files") != file_sizes(folder, (ONNX_FILE, ONNX_DATA_FILE)) or ONNX_FILE not in manifest["files"]:
        return "its ONNX files are missing or have other sizes than when they were written"
    return None


def plan_mismatch(manifest: dict[str, Any], key: EngineKey, folder: Path) -> str | None:
    """Why the entry's TensorRT plan may not be used on `key.trt` (None: it may)."""
    assert key.trt is not None
    have = manifest.get("tensorrt") or {}
    want = asdict(key.trt)
    if {k: have.get(k) for k in want} != want:
        return f"its plan was built for {_describe(have)}, this is {_describe(want)}"
    if have.get("files") != file_sizes(folder, (PLAN_FILE,)) or PLAN_FILE not in have["files"]:
        return "its plan is missing or has another size than when it was written"
    return None


def _describe(target: dict[str, Any]) -> str:
    if not target:
        return "nothing (no plan)"
    return f"TensorRT {target.get('tensorrt')} on {target.get('gpu')} (compute capability {target.get('compute_capability')})"
