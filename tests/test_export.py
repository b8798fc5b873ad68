"""ONNX export, the ONNX Runtime engine, the engine cache and its key; TensorRT where it can run.

Tiny random-weight diffusers models are built here; nothing is downloaded. TensorRT tests
(`-m trt`) skip with the reason when TensorRT or a CUDA GPU is missing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from onnx import numpy_helper

from vlrt.engines.base import INPUT_NAMES, UNET, VAE_DECODER, VAE_ENCODER
from vlrt.engines.modules import UNetModule, VaeDecoderModule, VaeEncoderModule
from vlrt.engines.ort_engine import OrtEngine
from vlrt.engines.trt_engine import TrtEngine, refit_unet, trt_available
from vlrt.errors import VlrtError
from vlrt.export import onnx_export
from vlrt.export.cache import EngineCache
from vlrt.export.manifest import (
    MANIFEST_FILE,
    ONNX_DATA_FILE,
    ONNX_FILE,
    PLAN_FILE,
    EngineKey,
    TrtTarget,
    model_hash,
    read_manifest,
)
from vlrt.export.onnx_export import check_onnx, export_onnx

TRT_OK, TRT_WHY = trt_available()
skip_without_trt = pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)

IMAGE = 16  # pixels; the tiny VAE has scale factor 2, so latents are 8x8
LATENT = IMAGE // 2
TOKENS, EMBED = 7, 32


def tiny_unet(seed: int = 0) -> UNetModule:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=EMBED,
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return UNetModule(unet).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE,
    ).eval()


def feed(component: str, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if component == UNET:
        return {
            "sample": torch.randn(rows, 4, LATENT, LATENT, generator=g),
            "timestep": torch.rand(rows, generator=g) * 999,  # fractional, as Euler schedules give
            "encoder_hidden_states": torch.randn(rows, TOKENS, EMBED, generator=g),
        }
    if component == VAE_ENCODER:
        return {"image": torch.rand(rows, 3, IMAGE, IMAGE, generator=g) * 2 - 1}
    return {"latent": torch.randn(rows, 4, LATENT, LATENT, generator=g)}


@pytest.fixture(scope="module")
def modules() -> dict[str, torch.nn.Module]:
    vae = tiny_vae()
    return {UNET: tiny_unet(), VAE_ENCODER: VaeEncoderModule(vae).eval(), VAE_DECODER: VaeDecoderModule(vae).eval()}


@pytest.fixture(scope="module")
def onnx_files(modules, tmp_path_factory) -> dict[str, Path]:
    """fp32 exports of the three components, plus the fp16 UNet under 'unet_fp16'."""
    root = tmp_path_factory.mktemp("onnx")
    files = {}
    for component, module in modules.items():
        files[component] = root / component / ONNX_FILE
        export_onnx(component, module, feed(component, 2), files[component])
    files["unet_fp16"] = root / "unet_fp16" / ONNX_FILE
    export_onnx(UNET, modules[UNET], feed(UNET, 2), files["unet_fp16"], precision="fp16")
    return files


def run_torch(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs)


# --- the exported graphs -------------------------------------------------------------------


@pytest.mark.parametrize("component", [UNET, VAE_ENCODER, VAE_DECODER])
def test_every_input_and_output_has_a_dynamic_batch_axis(onnx_files, component):
    graph = onnx.load(str(onnx_files[component])).graph
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch", value.name
        assert all(d.dim_value > 0 for d in dims[1:]), value.name  # everything else static


@pytest.mark.parametrize("name", [UNET, "unet_fp16"])
def test_unet_timestep_is_a_float32_vector(onnx_files, name):
    graph = onnx.load(str(onnx_files[name])).graph
    (timestep,) = [v for v in graph.input if v.name == "timestep"]
    assert timestep.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param for d in timestep.type.tensor_type.shape.dim] == ["batch"]


def test_export_leaves_the_module_untouched(modules, onnx_files):
    assert all(p.dtype == torch.float32 for p in modules[UNET].parameters())  # fp16 export used a copy


def test_fp16_export_has_fp16_weights_and_io(onnx_files):
    model = onnx.load(str(onnx_files["unet_fp16"]))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    weights = [i for i in model.graph.initializer if i.data_type in float_types and len(i.dims) > 0]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert types == {
        "sample": onnx.TensorProto.FLOAT16,
        "timestep": onnx.TensorProto.FLOAT,
        "encoder_hidden_states": onnx.TensorProto.FLOAT16,
        "noise_pred": onnx.TensorProto.FLOAT16,
    }


def test_fp16_export_normalises_and_softmaxes_in_fp32(onnx_files):
    """A strongly typed plan computes each node in its file's type: these must say float32."""
    wide = {"InstanceNormalization", "LayerNormalization", "Softmax"}
    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_files["unet_fp16"])))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {i.name: i.data_type for i in graph.initializer}
    nodes = [n for n in graph.node if n.op_type in wide]
    fp32_nodes = [n for n in onnx.load(str(onnx_files[UNET])).graph.node if n.op_type in wide]
    assert {n.op_type for n in nodes} == wide and len(nodes) == len(fp32_nodes)  # all of them, of each kind
    for node in nodes:
        assert all(types[name] == onnx.TensorProto.FLOAT for name in [*node.input, *node.output] if name), node.name
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in convs)  # the rest stays fp16


# --- ONNX Runtime against torch ------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("component", [UNET, VAE_ENCODER, VAE_DECODER])
def test_ort_engine_matches_torch(modules, onnx_files, component, rows):
    engine = OrtEngine(component, onnx_files[component], max_batch=4, device=torch.device("cpu"))
    inputs = feed(component, rows, seed=rows)
    (got,) = engine(**inputs).values()
    want = run_torch(modules[component], inputs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def test_ort_engine_runs_the_fp16_export(modules, onnx_files):
    engine = OrtEngine(UNET, onnx_files["unet_fp16"], max_batch=4, device=torch.device("cpu"))
    inputs = feed(UNET, 3, seed=5)
    got = engine(**inputs)["noise_pred"]
    want = run_torch(modules[UNET], inputs)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_weights_past_the_limit_go_to_one_aligned_data_file(modules, onnx_files, tmp_path, monkeypatch, precision):
    """The path the SD 1.5 and SDXL UNets take (over 2 GB), shown on the tiny UNet with the limit lowered:
    one data file beside the model, every tensor at an aligned offset, the same function as the
    embedded export, and every initializer named after its parameter (what re-weighting needs)."""
    monkeypatch.setattr(onnx_export, "EMBEDDED_LIMIT", 0)
    path = tmp_path / ONNX_FILE
    export_onnx(UNET, modules[UNET], feed(UNET, 2), path, precision=precision)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ONNX_FILE, ONNX_DATA_FILE]
    graph = onnx.load(str(path), load_external_data=False).graph
    assert graph.initializer and all(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer)
    offsets = [int({e.key: e.value for e in i.external_data}["offset"]) for i in graph.initializer]
    assert all(offset % 4096 == 0 for offset in offsets) and len(set(offsets)) == len(offsets)
    assert {i.name for i in graph.initializer} <= set(modules[UNET].state_dict())
    assert [i.name for i in graph.input] == list(INPUT_NAMES[UNET])
    embedded = onnx_files[UNET if precision == "fp32" else "unet_fp16"]
    inputs = feed(UNET, 3, seed=4)
    got = OrtEngine(UNET, path, max_batch=4, device=torch.device("cpu"))(**inputs)["noise_pred"]
    want = OrtEngine(UNET, embedded, max_batch=4, device=torch.device("cpu"))(**inputs)["noise_pred"]
    assert torch.equal(got, want)


def test_chunking_at_max_batch_equals_one_call(onnx_files):
    inputs = feed(UNET, 5, seed=7)
    small = OrtEngine(UNET, onnx_files[UNET], max_batch=2, device=torch.device("cpu"))
    large = OrtEngine(UNET, onnx_files[UNET], max_batch=8, device=torch.device("cpu"))
    chunked, whole = small(**inputs)["noise_pred"], large(**inputs)["noise_pred"]
    assert (small.calls, large.calls) == (3, 1)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_check_onnx_measures_and_rejects(modules, onnx_files):
    inputs = feed(UNET, 2, seed=3)
    assert check_onnx(onnx_files[UNET], modules[UNET], inputs, atol=1e-4) <= 1e-4
    with pytest.raises(VlrtError, match="differs from torch"):
        check_onnx(onnx_files[UNET], tiny_unet(seed=9), inputs, atol=1e-4)


def test_corrupt_onnx_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "engine" / ONNX_FILE
    path.parent.mkdir()
    path.write_bytes(b"\x08\x07 this is not a protobuf" * 100)
    with pytest.raises(VlrtError) as err:
        OrtEngine(UNET, path, max_batch=2, device=torch.device("cpu"))
    assert str(path) in str(err.value) and "vlrt export" in str(err.value)
    assert "\n" not in str(err.value)


def test_onnx_of_another_component_is_refused(onnx_files):
    with pytest.raises(VlrtError, match="not those of a unet engine"):
        OrtEngine(UNET, onnx_files[VAE_DECODER], max_batch=2, device=torch.device("cpu"))


# --- model hash ----------------------------------------------------------------------------


def test_model_hash_follows_the_weights_only():
    a, b = tiny_unet(), tiny_unet()
    assert model_hash(a) == model_hash(b) == model_hash(copy.deepcopy(a))
    with torch.no_grad():
        b.unet.up_blocks[-1].attentions[0].proj_out.weight[0, 0] += 1e-3  # one weight, like a LoRA
    assert model_hash(b) != model_hash(a)


# --- the cache -----------------------------------------------------------------------------


class Builds:
    """Fake builders that copy a prepared ONNX and count calls."""

    def __init__(self, onnx_path: Path) -> None:
        self.onnx_path, self.onnx, self.plans = onnx_path, 0, 0

    def build(self, folder: Path) -> None:
        self.onnx += 1
        shutil.copy(self.onnx_path, folder / ONNX_FILE)

    def plan(self, onnx_path: Path, plan_path: Path) -> None:
        assert onnx_path.is_file()
        self.plans += 1
        plan_path.write_bytes(b"plan %d" % self.plans)


@pytest.fixture
def key() -> EngineKey:
    return EngineKey(model_hash="ab" * 32, height=IMAGE, width=IMAGE, max_batch=4, precision="fp32")


@pytest.fixture
def builds(onnx_files) -> Builds:
    return Builds(onnx_files[VAE_DECODER])


def test_cache_builds_once_then_reuses(tmp_path, key, builds):
    cache = EngineCache(tmp_path)
    folder = cache.find_or_build(VAE_DECODER, key, builds.build)
    assert folder == tmp_path / f"{'ab' * 6}-vae_decoder-16x16-b4-fp32"
    assert cache.find_or_build(VAE_DECODER, key, builds.build) == folder
    assert builds.onnx == 1
    manifest = read_manifest(folder)
    assert manifest["component"] == VAE_DECODER and manifest["batch"] == {"min": 1, "max": 4}
    assert manifest["inputs"] == [{"name": "latent", "dtype": "float32", "shape": ["batch", 4, LATENT, LATENT]}]
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime", "diffusers"}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [folder.name]


@pytest.mark.parametrize(
    "change",
    [
        {"height": 32},
        {"width": 32},
        {"model_hash": "cd" * 32},
        {"max_batch": 8},
        {"precision": "fp16"},
        {"opset": 18},
        {"versions": {"torch": "0.0", "onnx": "0", "onnxruntime": "0", "diffusers": "0"}},
    ],
)
def test_cache_never_loads_an_entry_for_another_key(tmp_path, key, builds, change):
    cache = EngineCache(tmp_path)
    cache.find_or_build(VAE_DECODER, key, builds.build)
    other = dataclasses.replace(key, **change)
    assert cache.find(VAE_DECODER, other) is None
    cache.find_or_build(VAE_DECODER, other, builds.build)
    assert builds.onnx == 2
    assert cache.find(VAE_DECODER, other) is not None
    if cache.folder(VAE_DECODER, other) == cache.folder(VAE_DECODER, key):  # same folder, rebuilt in place
        assert cache.find(VAE_DECODER, key) is None


def test_cache_entry_of_another_component_is_separate(tmp_path, key, builds):
    cache = EngineCache(tmp_path)
    cache.find_or_build(VAE_DECODER, key, builds.build)
    assert cache.find(VAE_ENCODER, key) is None


def test_crashed_build_leaves_nothing_that_looks_complete(tmp_path, key, builds):
    cache = EngineCache(tmp_path)

    def crash(folder: Path) -> None:
        builds.build(folder)  # model.onnx is written, then the build dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.find_or_build(VAE_DECODER, key, crash)
    assert cache.find(VAE_DECODER, key) is None
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_killed_build_leftovers_are_not_taken_as_complete(tmp_path, key, builds):
    """A process killed mid-build leaves a temporary folder, or (copied by hand) a folder without manifest."""
    cache = EngineCache(tmp_path)
    folder = cache.folder(VAE_DECODER, key)
    for half in (folder, folder.with_name(f".{folder.name}.tmp-99999")):
        half.mkdir()
        shutil.copy(builds.onnx_path, half / ONNX_FILE)
    assert cache.find(VAE_DECODER, key) is None
    cache.find_or_build(VAE_DECODER, key, builds.build)
    assert builds.onnx == 1 and (folder / MANIFEST_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [folder.name]


def test_truncated_or_grown_file_is_rebuilt(tmp_path, key, builds):
    cache = EngineCache(tmp_path)
    folder = cache.find_or_build(VAE_DECODER, key, builds.build)
    with open(folder / ONNX_FILE, "r+b") as handle:
        handle.truncate(100)
    assert cache.find(VAE_DECODER, key) is None
    cache.find_or_build(VAE_DECODER, key, builds.build)
    assert builds.onnx == 2
    OrtEngine(VAE_DECODER, folder / ONNX_FILE, max_batch=4, device=torch.device("cpu"))


def test_unreadable_manifest_means_incomplete(tmp_path, key, builds):
    cache = EngineCache(tmp_path)
    folder = cache.find_or_build(VAE_DECODER, key, builds.build)
    (folder / MANIFEST_FILE).write_text('{"component": ')
    assert cache.find(VAE_DECODER, key) is None


def test_plan_for_another_tensorrt_or_gpu_is_rebuilt_alone(tmp_path, key, builds):
    """The cache logic for plans, with fake plans: an entry for another TensorRT or GPU is never used."""
    cache = EngineCache(tmp_path)
    here = dataclasses.replace(key, trt=TrtTarget("10.8.0", "NVIDIA H100 80GB HBM3", "9.0"))
    folder = cache.find_or_build(VAE_DECODER, here, builds.build, builds.plan)
    assert (builds.onnx, builds.plans) == (1, 1) and (folder / PLAN_FILE).is_file()
    assert cache.find(VAE_DECODER, key) == folder  # the ONNX alone still serves ONNX Runtime
    for target in (
        TrtTarget("10.9.0", "NVIDIA H100 80GB HBM3", "9.0"),
        TrtTarget("10.8.0", "NVIDIA GeForce RTX 4090", "8.9"),
    ):
        there = dataclasses.replace(key, trt=target)
        assert cache.find(VAE_DECODER, there) is None
        cache.find_or_build(VAE_DECODER, there, builds.build, builds.plan)
        assert cache.find(VAE_DECODER, there) == folder
    assert (builds.onnx, builds.plans) == (1, 3)
    assert cache.find(VAE_DECODER, here) is None
    assert json.loads((folder / MANIFEST_FILE).read_text())["tensorrt"]["gpu"] == "NVIDIA GeForce RTX 4090"


def test_trt_key_needs_a_plan_builder(tmp_path, key, builds):
    with pytest.raises(ValueError):
        EngineCache(tmp_path).find_or_build(VAE_DECODER, dataclasses.replace(key, trt=TrtTarget("1", "g", "1.0")), builds.build)


def test_trt_unavailability_says_why_and_how():
    ok, why = trt_available()
    if not ok:
        assert "pip install tensorrt" in why and "\n" not in why


# --- TensorRT (skipped without TensorRT and a CUDA GPU) ------------------------------------


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@pytest.mark.trt
@skip_without_trt
@pytest.mark.parametrize("rows", [1, 3])
def test_trt_plan_matches_ort(onnx_files, tmp_path, cuda, rows):
    from vlrt.export.trt_build import build_plan

    plan = tmp_path / PLAN_FILE
    build_plan(UNET, onnx_files["unet_fp16"], plan, max_batch=4)
    engine = TrtEngine(UNET, plan, max_batch=4, device=cuda)
    reference = OrtEngine(UNET, onnx_files[UNET], max_batch=4, device=torch.device("cpu"))
    inputs = feed(UNET, rows, seed=11)
    got = engine(**{k: v.to(cuda) for k, v in inputs.items()})["noise_pred"]
    want = reference(**inputs)["noise_pred"]
    assert got.device == cuda and got.dtype == torch.float32
    assert (got.cpu() - want).abs().max().item() <= 2e-2 * want.abs().max().item()


@pytest.mark.trt
@skip_without_trt
def test_trt_cache_rebuilds_a_plan_of_another_version(onnx_files, tmp_path, cuda, key):
    from vlrt.export.trt_build import build_plan

    cache = EngineCache(tmp_path)
    key = dataclasses.replace(key, precision="fp16", trt=TrtTarget.current(cuda))
    builds = Builds(onnx_files["unet_fp16"])
    plans = []

    def plan(onnx_path: Path, plan_path: Path) -> None:
        plans.append(plan_path)
        build_plan(UNET, onnx_path, plan_path, max_batch=key.max_batch)

    folder = cache.find_or_build(UNET, key, builds.build, plan)
    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["tensorrt"]["tensorrt"] = "0.0.1"  # as if built by another TensorRT
    manifest_path.write_text(json.dumps(manifest))
    assert cache.find(UNET, key) is None
    cache.find_or_build(UNET, key, builds.build, plan)
    assert (builds.onnx, len(plans)) == (1, 2)
    TrtEngine(UNET, folder / PLAN_FILE, max_batch=key.max_batch, device=cuda)


@pytest.mark.trt
@skip_without_trt
def test_trt_refit_takes_the_new_weights(onnx_files, modules, tmp_path, cuda):
    from vlrt.export.trt_build import build_plan

    other = tiny_unet(seed=21)
    other_onnx = tmp_path / "other" / ONNX_FILE
    export_onnx(UNET, other, feed(UNET, 2), other_onnx, precision="fp16")
    plan = tmp_path / PLAN_FILE
    build_plan(UNET, onnx_files["unet_fp16"], plan, max_batch=2)
    inputs = feed(UNET, 2, seed=13)
    want = run_torch(other, inputs)
    scale = want.abs().max().item()

    engine = TrtEngine(UNET, plan, max_batch=2, device=cuda)
    engine.refit(other_onnx)
    got = engine(**{k: v.to(cuda) for k, v in inputs.items()})["noise_pred"].cpu()
    assert (got - want).abs().max().item() <= 2e-2 * scale

    refitted = tmp_path / "refitted.plan"
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(other_onnx)).graph.initializer}
    refit_unet(plan, weights, refitted)
    got = TrtEngine(UNET, refitted, max_batch=2, device=cuda)(**{k: v.to(cuda) for k, v in inputs.items()})
    assert (got["noise_pred"].cpu() - want).abs().max().item() <= 2e-2 * scale


# --- ONNX Runtime on CUDA (skipped without onnxruntime-gpu and a CUDA GPU) ------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()),
    reason="needs a CUDA GPU and onnxruntime-gpu",
)
def test_ort_engine_on_cuda_matches_cpu(onnx_files):
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = feed(UNET, 3, seed=17)
    got = OrtEngine(UNET, onnx_files[UNET], max_batch=4, device=device)(**{k: v.to(device) for k, v in inputs.items()})
    want = OrtEngine(UNET, onnx_files[UNET], max_batch=4, device=torch.device("cpu"))(**inputs)
    assert got["noise_pred"].device == device
    np.testing.assert_allclose(got["noise_pred"].cpu().numpy(), want["noise_pred"].numpy(), atol=1e-3)
