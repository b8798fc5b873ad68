"""An existing ONNX export given new weight values: a LoRA scale changed, so no new trace.

An export (`onnx_export`, no constant folding) names every initializer after the module
parameter it holds; parameters of equal value share the first one's initializer. A module of
the same structure (`manifest.structure_hash`: same names, shapes, dtypes and configs), with
other values, traces to the same graph, so its export is the old graph with each initializer
replaced by the new value of the parameter of that name. That holds as long as the parameters
that shared an initializer still share one value; otherwise the graph would differ, and
`reweight_onnx` says so (returns False) so that the caller exports afresh.

Writing the re-weighted file costs a read of the graph (not of its weights: only those that
parameters shared are read, from the old data file in place) and a write of the weights, tensor
by tensor from the module (`write_onnx`), against a full trace and export (minutes for the SD 1.5
UNet on a CPU); the result is a complete, ordinary ONNX file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from vlrt.export.onnx_export import PRECISIONS, module_tensors, progress, write_onnx


def reweight_onnx(base: Path, module: nn.Module, path: Path, precision: str) -> bool:
    """Write to `path` the graph of `base` with `module`'s weights; False when the graphs would differ."""
    dtype = PRECISIONS[precision]
    tensors = module_tensors(module)
    with progress(f"re-weighting {base} into {path}"):
        model = onnx.load(str(base), load_external_data=False)
        initializers = {init.name: init for init in model.graph.initializer}
        if not initializers.keys() <= tensors.keys():
            return False  # an initializer that is no parameter: not an export this can re-weight
        for name, init in initializers.items():
            tensor = tensors[name]
            wanted = dtype if tensor.is_floating_point() else tensor.dtype
            if tuple(init.dims) != tuple(tensor.shape) or onnx.helper.tensor_dtype_to_np_dtype(init.data_type) != _np_dtype(wanted):
                return False
        if not _shared_still_equal(base, tensors, initializers, dtype):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        write_onnx(model, {name: tensors[name] for name in initializers}, path, dtype)
    return True


def _shared_still_equal(base: Path, tensors: dict[str, torch.Tensor], initializers: dict[str, onnx.TensorProto],
                        dtype: torch.dtype) -> bool:
    """Every tensor without an initializer of its own shared one in `base` (equal values then): it
    must still equal that initializer's new value. The initializer is found by its old value, which
    equals the tensor's own when the tensor is unchanged (an initializer's value is unique within one
    export); only initializers of a shape such a tensor has are read."""
    missing = {name: _array(t, dtype) for name, t in tensors.items() if name not in initializers}
    if not missing:
        return True
    shapes = {(value.shape, value.dtype.str) for value in missing.values()}
    by_value = {}
    for name, init in initializers.items():
        old = _stored(base, init)
        if (old.shape, old.dtype.str) in shapes:
            by_value[_fingerprint(old)] = name
    for value in missing.values():
        shared = by_value.get(_fingerprint(value))
        if shared is None or not np.array_equal(_array(tensors[shared], dtype), value):
            return False
    return True


def _stored(base: Path, init: onnx.TensorProto) -> np.ndarray:
    """An initializer's value as `base` holds it, mapped from its data file when it is external."""
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(init)
    info = {entry.key: entry.value for entry in init.external_data}
    return np.memmap(base.parent / info["location"], dtype=onnx.helper.tensor_dtype_to_np_dtype(init.data_type),
                     mode="r", offset=int(info.get("offset", 0)), shape=tuple(init.dims))


def _array(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).numpy()


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _fingerprint(array: np.ndarray) -> tuple:
    return array.shape, array.dtype.str, hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()
