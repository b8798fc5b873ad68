"""An existing ONNX export given new weight values: a LoRA scale changed, so no new trace.

An export (`onnx_export`, no constant folding) names every initializer after the module
parameter it holds; parameters of equal value share the first one's initializer. A module of
the same structure (`manifest.structure_hash`: same names, shapes, dtypes and configs), with
other values, traces to the same graph, so its export is the old graph with each initializer
replaced by the new value of the parameter of that name. That holds as long as the parameters
that shared an initializer still share one value; otherwise the graph would differ, and
`reweight_onnx` says so (returns False) so that the caller exports afresh.

Writing the re-weighted file costs a read and a write of the weights, against a full trace and
export (minutes for the SD 1.5 UNet on a CPU); the result is a complete, ordinary ONNX file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from vlrt.export.onnx_export import PRECISIONS, progress, save_onnx


def reweight_onnx(base: Path, module: nn.Module, path: Path, precision: str) -> bool:
    """Write to `path` the graph of `base` with `module`'s weights; False when the graphs would differ."""
    dtype = PRECISIONS[precision]
    state = {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype) for name, t in module.state_dict().items()}
    with progress(f"re-weighting {base} into {path}"):
        model = onnx.load(str(base))
        initializers = {init.name: init for init in model.graph.initializer}
        if not initializers.keys() <= state.keys():
            return False  # an initializer that is no parameter: not an export this can re-weight
        arrays = {name: state[name].numpy() for name in initializers}
        for name, init in initializers.items():
            if tuple(init.dims) != arrays[name].shape or onnx.helper.tensor_dtype_to_np_dtype(init.data_type) != arrays[name].dtype:
                return False
        if not _shared_still_equal(state, initializers, arrays):
            return False
        for name, init in initializers.items():
            init.CopyFrom(numpy_helper.from_array(arrays[name], name))
        path.parent.mkdir(parents=True, exist_ok=True)
        external = base.with_name(base.name + ".data").is_file()
        save_onnx(model, path, external)
    return True


def _shared_still_equal(state: dict[str, torch.Tensor], initializers: dict[str, onnx.TensorProto], arrays: dict[str, np.ndarray]) -> bool:
    """Every parameter without an initializer of its own shared one in `base` (equal values then):
    it must still equal that initializer's new value. It is found by its value, which is unchanged
    when the parameter is (an initializer's value is unique within one export)."""
    missing = [name for name in state if name not in initializers]
    if not missing:
        return True
    by_value = {_fingerprint(numpy_helper.to_array(init)): name for name, init in initializers.items()}
    for name in missing:
        value = state[name].numpy()
        shared = by_value.get(_fingerprint(value))
        if shared is None or not np.array_equal(arrays[shared], value):
            return False
    return True


def _fingerprint(array: np.ndarray) -> tuple:
    return array.shape, array.dtype.str, hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()
