"""ONNX export of the engine modules, and a check that ONNX Runtime computes what torch computes.

Why the choices:
- The legacy TorchScript exporter (`dynamo=False`): about 20x faster than the dynamo exporter on
  the UNet and just as exact (NOTES.md); it prints a deprecation warning, which we silence.
- Every input and output gets a dynamic batch axis; all other dimensions (resolution, prompt
  length) stay as in the example, because TensorRT is several times faster with static shapes.
- fp16 export: weights, activations and inputs are float16 except the UNet `timestep`, which
  stays a float32 input; the UNet computes its sinusoidal embedding in float32 and casts the
  result to float16 itself. float16 cannot hold fractional timesteps near 1000 (its spacing
  there is 0.5). TensorRT 10/11 builds such a graph strongly typed, without precision flags.
- In an fp16 export the normalisations (GroupNorm, exported as InstanceNormalization, and
  LayerNormalization) and the attention softmax compute in float32 between two Casts
  (`FP32_OPS`): a strongly typed plan computes each node in the type the file gives it (the
  ONNX parser sets no compute precision), and these reductions overflow or lose all precision
  in fp16, which comes out as NaN or black frames. The rest stays fp16, as fast as before.
- No constant folding at export: it would fold the transposes of the Linear weights into new
  initializers with generated names, and a weight could no longer be found by its parameter
  name. Unfolded, every initializer is a parameter of the module, by name (parameters of equal
  value share one), which is what re-weighting an export for new LoRA weights needs
  (`reweight.py`). ONNX Runtime and TensorRT fold these constants themselves when they load the
  graph, so inference costs the same.
- The graph is traced without its weights (`export_params=False`: they come out as graph inputs
  named after their parameters) and the weights are then written tensor by tensor from the
  module (`_attach_weights`). The exporter would otherwise hold the module, a serialized copy of
  every weight, and a parsed copy of that at once (three times the weights: 31 GB for SDXL's
  UNet in fp32, more than many machines have); this way no second copy of the weights is held
  (SDXL's UNet exports at 1.4 times its weights: the module and the trace's working memory).
- Models whose weights would pass protobuf's 2 GB (the SD 1.5 UNet in fp32: 3.4 GB) are written
  with ONNX external data in one file beside the model, `<name>.data` (`model.onnx.data`), each
  tensor at a 4 KiB-aligned offset so that runtimes can map it.
"""

from __future__ import annotations

import copy
import io
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from vlrt.engines.base import INPUT_NAMES, OUTPUT_NAMES
from vlrt.engines.ort_engine import load_session, run_session
from vlrt.errors import VlrtError

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
BATCH_AXIS = "batch"
EMBEDDED_LIMIT = 2**31 - 2**27  # weights past this go to external data: protobuf's 2 GiB, less room for the graph
EXTERNAL_ALIGNMENT = 4096
FP32_OPS = frozenset({"InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax"})


@contextmanager
def progress(what: str) -> Iterator[None]:
    """Log the start and the duration of a long step (exports and builds take minutes)."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


def export_onnx(
    component: str,
    module: nn.Module,
    example_feed: Mapping[str, torch.Tensor],
    path: Path,
    *,
    precision: str = "fp32",
    opset: int = 17,
    names: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
) -> None:
    """Trace `module` (one of `vlrt.engines.modules`) into `path`, batch axis dynamic.

    The weights of `module` are not modified (an fp16 export traces a float16 copy, on CUDA
    where there is one); it is put in eval mode. The example feed only fixes the static dimensions (resolution, prompt
    length); its values do not matter. `names` (inputs, outputs) for the components whose names
    depend on the model (`vlrt.engines.base.control_names`).
    """
    if names is None and component not in INPUT_NAMES:
        raise ValueError(f"unknown component {component!r}; expected one of {sorted(INPUT_NAMES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    inputs, outputs = names or (INPUT_NAMES[component], OUTPUT_NAMES[component])
    if set(example_feed) != set(inputs):
        raise ValueError(f"{component} takes inputs {inputs}, got {tuple(example_feed)}")
    traced = _traceable(module, PRECISIONS[precision]).eval()
    args = tuple(_example(name, example_feed[name], traced, PRECISIONS[precision]) for name in inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with progress(f"exporting {component} to ONNX ({precision}, opset {opset})"):
        # The exporter's shape inference loses some static output sizes (the VAE encoder's);
        # the traced run knows them all.
        shapes: list[list[tuple[int, ...]]] = []
        hook = traced.register_forward_hook(
            lambda _m, _i, out: shapes.append([tuple(o.shape) for o in (out if isinstance(out, tuple) else (out,))])
        )
        graph = io.BytesIO()  # the graph only: its weights are written afterwards, from the module
        with torch.no_grad(), warnings.catch_warnings(), _removing(hook):
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(
                traced,
                args,
                graph,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes={name: {0: BATCH_AXIS} for name in (*inputs, *outputs)},
                opset_version=opset,
                do_constant_folding=False,
                dynamo=False,
                export_params=False,
            )
        model = onnx.load_from_string(graph.getvalue())
    _set_output_sizes(model, [shape[1:] for shape in shapes[0]])
    if precision == "fp16":
        compute_in_fp32(model.graph, FP32_OPS)
    with progress(f"writing {path.name}"):
        _attach_weights(model, traced, inputs, path)
    with progress(f"checking {path.name}"):
        onnx.checker.check_model(str(path))  # by path, so that external data and > 2 GB work


def _traceable(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` itself when it already has `dtype`, else a converted copy.

    The copy's tensors are made in `dtype` on the CPU, never as a second full-precision copy on
    the GPU (the SD 1.5 UNet is 3.4 GB in fp32). A float16 trace then runs on CUDA where there
    is one: torch's CPU float16 kernels are slow (the SD 1.5 UNet's traced forward alone takes
    minutes on a CPU). The ONNX file does not depend on where the trace ran.
    """
    device = next(module.parameters()).device
    if dtype == torch.float16 and device.type == "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.dtype == dtype and t.device == device for t in tensors if t.is_floating_point()):
        return module
    return cpu_copy(module, dtype).to(device)


def cpu_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of `module` whose floating-point tensors are `dtype` on the CPU, made tensor by
    tensor (the copy never holds the original's precision on the original's device)."""
    memo: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        value = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
    return copy.deepcopy(module, memo)


def _example(name: str, value: torch.Tensor, module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    device = next(module.parameters()).device
    value = value.to(device, torch.float32 if name == "timestep" else dtype)
    # A batch of 1 lets the tracer fold size-1 broadcasts into constants; trace with 2 rows.
    return torch.cat([value, value]) if value.shape[0] == 1 else value


@contextmanager
def _removing(handle: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


def _set_output_sizes(model: onnx.ModelProto, output_rests: list[tuple[int, ...]]) -> None:
    """Give every output its static sizes after the batch axis."""
    for output, rest in zip(model.graph.output, output_rests, strict=True):
        for dim, size in zip(output.type.tensor_type.shape.dim[1:], rest, strict=True):
            dim.dim_value = size  # replaces a symbolic size


def _attach_weights(model: onnx.ModelProto, module: nn.Module, inputs: tuple[str, ...], path: Path) -> None:
    """Turn the weight inputs of a graph traced with `export_params=False` into initializers and
    write the model to `path` (`write_onnx`).

    The exporter names each weight input after its parameter or buffer (parameters of equal value
    share the first one's input), which is what re-weighting (`reweight.py`) relies on.
    """
    tensors = module_tensors(module)
    weights = [value.name for value in model.graph.input if value.name not in inputs]
    unknown = [name for name in weights if name not in tensors]
    if unknown:
        raise ValueError(f"the traced graph takes inputs that are neither feeds nor weights: {unknown[:5]}")
    kept = [value for value in model.graph.input if value.name in inputs]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    write_onnx(model, {name: tensors[name] for name in weights}, path)


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by its name (each name of a tied one), as the exporter names weight inputs."""
    return {**dict(module.named_buffers(remove_duplicate=False)), **dict(module.named_parameters(remove_duplicate=False))}


def write_onnx(model: onnx.ModelProto, weights: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    """Write `model` to `path` with `weights` as its initializers (floating-point ones converted to
    `dtype` where given): inside the file, or, past protobuf's limit, in one file beside it,
    `<path>.data`, written tensor by tensor so that no second copy of the weights is ever held."""
    def array(tensor: torch.Tensor) -> np.ndarray:
        wanted = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.detach().to("cpu", wanted).contiguous().numpy()

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    del model.graph.initializer[:]
    size = sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
               for t in weights.values())
    if size < EMBEDDED_LIMIT:
        model.graph.initializer.extend(numpy_helper.from_array(array(tensor), name) for name, tensor in weights.items())
        onnx.save_model(model, str(path))
        return
    with open(data, "wb") as out:
        for name, tensor in weights.items():
            values = array(tensor)
            out.seek(-out.tell() % EXTERNAL_ALIGNMENT, 1)
            init = onnx.TensorProto(name=name, dims=values.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, text in (("location", data.name), ("offset", out.tell()), ("length", values.nbytes)):
                init.external_data.add(key=key, value=str(text))
            out.write(values.tobytes())
            model.graph.initializer.append(init)
    onnx.save_model(model, str(path))


def compute_in_fp32(graph: onnx.GraphProto, op_types: frozenset[str]) -> int:
    """Make every node of `op_types` compute in float32 inside an fp16 graph: its inputs are cast
    to float32 and its outputs back to float16. No initializer changes (re-weighting still finds
    every weight by its parameter's name). Returns how many nodes were changed."""
    nodes: list[onnx.NodeProto] = []
    changed = 0
    for node in graph.node:
        if node.op_type not in op_types:
            nodes.append(node)
            continue
        changed += 1
        for i, name in enumerate(node.input):
            if name:
                cast = f"{node.name or node.output[0]}/fp32_in{i}"
                nodes.append(onnx.helper.make_node("Cast", [name], [cast], name=cast, to=onnx.TensorProto.FLOAT))
                node.input[i] = cast
        backs = []
        for i, name in enumerate(node.output):
            if name:
                wide = f"{node.name or name}/fp32_out{i}"
                backs.append(onnx.helper.make_node("Cast", [wide], [name], name=f"{wide}/fp16", to=onnx.TensorProto.FLOAT16))
                node.output[i] = wide
        nodes += [node, *backs]
    del graph.node[:]
    graph.node.extend(nodes)
    return changed


def check_onnx(path: Path, module: nn.Module, feed: Mapping[str, torch.Tensor], atol: float) -> float:
    """Largest absolute difference between ONNX Runtime (CPU) and `module` in torch on `feed`.

    Raises VlrtError when it exceeds `atol`, so an export that computes something else is
    caught before an engine is built from it. Inputs are cast to the types the ONNX declares.
    """
    session = load_session(Path(path), torch.device("cpu"))
    got = run_session(session, feed)
    with torch.no_grad():
        want = module(**feed)
    (name,) = got
    diff = (got[name].float() - want.float().cpu()).abs().max().item()
    if not diff <= atol:  # also catches NaN
        raise VlrtError(
            f"ONNX export {path} differs from torch by {diff:.3g} (tolerance {atol:g}); "
            "delete it and export again, and report a bug if it persists"
        )
    return diff
