"""What a first GPU run would hit, shown on the CPU with stand-ins (issue 14, item 5).

TensorRT cannot be installed here, so a fake `tensorrt` module (and a fake `polygraphy`) is put
into `sys.modules`: it records what vlrt asks of it (loggers, builder flags, refits) and
behaves as the documented API does where the test needs it to.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from vlrt.engines.base import UNET, VAE_DECODER, Engine
from vlrt.errors import VlrtError


class _Returns(Engine):
    """A stand-in engine whose output is a given tensor."""

    backend = "stand-in"

    def __init__(self, component: str, value: torch.Tensor, max_batch: int = 4) -> None:
        super().__init__(component, max_batch, torch.device("cpu"))
        self.value = value
        self.done = 0  # rows already returned: a split call continues where the last part ended

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = next(iter(feed.values())).shape[0]
        self.done += rows
        return {"image": self.value[self.done - rows : self.done]}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("rows", [2, 6])  # one call, and two calls of at most 4 rows
def test_a_non_finite_engine_output_is_a_clear_error_naming_the_component(bad, rows):
    value = torch.zeros(6, 3, 4, 4)
    value[rows - 1, 1, 2, 3] = bad
    engine = _Returns(VAE_DECODER, value)
    with pytest.raises(VlrtError) as err:
        engine(latent=torch.zeros(rows, 4, 2, 2))
    message = str(err.value)
    assert "\n" not in message
    assert "vae_decoder" in message and "NaN or infinite" in message and "--precision fp32" in message


def test_finite_outputs_pass_unchanged():
    value = torch.randn(6, 3, 4, 4)
    got = _Returns(VAE_DECODER, value)(latent=torch.zeros(6, 4, 2, 2))["image"]
    assert torch.equal(got, value)


# --- TensorRT availability and logging, with a fake tensorrt ------------------------------------


def test_trt_available_needs_a_runtime_that_starts(monkeypatch):
    from fake_trt import install

    from vlrt.engines.trt_engine import trt_available

    install(monkeypatch, runtime_fails=True)
    ok, why = trt_available()
    assert not ok and "TensorRT cannot start a runtime (CUDA initialization failure" in why and "\n" not in why
    install(monkeypatch)
    assert trt_available() == (True, "TensorRT 10.9.0 on Fake GPU")


@pytest.mark.parametrize(("polygraphy", "problem"), [(None, "polygraphy is not installed"), ("0.48.1", "polygraphy 0.48.1 is older than 0.49.1")])
def test_trt_available_needs_polygraphy_0_49_1(monkeypatch, polygraphy, problem):
    from fake_trt import install

    from vlrt.engines.trt_engine import trt_available

    install(monkeypatch, polygraphy=polygraphy)
    ok, why = trt_available()
    assert not ok and problem in why and "pip install tensorrt-cu" in why


@pytest.mark.parametrize(("cuda", "package"), [("12.8", "tensorrt-cu12"), ("13.0", "tensorrt-cu13"), (None, "tensorrt-cu12")])
def test_install_advice_follows_torch_cuda_version(monkeypatch, cuda, package):
    from vlrt.engines.trt_engine import install_hint

    monkeypatch.setattr(torch.version, "cuda", cuda)
    hint = install_hint()
    assert f"pip install {package} polygraphy --extra-index-url https://pypi.nvidia.com" in hint
    assert ("a CUDA build of torch" in hint) == (cuda is None)


def test_auto_falls_back_to_ort_with_one_line_saying_why(monkeypatch):
    from fake_trt import install

    from vlrt.render.engine_picker import resolve_backend

    install(monkeypatch, runtime_fails=True)
    lines: list[str] = []
    assert resolve_backend("auto", torch.device("cuda", 0), lines.append) == "ort"
    assert len(lines) == 1 and "ONNX Runtime" in lines[0] and "TensorRT cannot start a runtime" in lines[0]
    install(monkeypatch)
    lines.clear()
    assert resolve_backend("auto", torch.device("cuda", 0), lines.append) == "trt" and not lines


class _Logs(Engine):
    """Wraps an engine; logs through TensorRT's and polygraphy's loggers at every call, as a plan's
    load, build and run do."""

    def __init__(self, inner: Engine) -> None:
        from vlrt.engines.trt_engine import trt_logger

        super().__init__(inner.component, inner.max_batch, inner.device)
        self.inner, self.backend = inner, "trt"
        self.logger = trt_logger()

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import tensorrt as trt
        from polygraphy.logger import G_LOGGER

        self.logger.log(trt.ILogger.Severity.WARNING, "Using default stream in enqueueV3() may lead to performance issues")
        G_LOGGER.warning("Input tensor: sample | Buffer dtype (float32) does not match expected input dtype")
        G_LOGGER.info("Loading bytes from model.plan")
        return self.inner._run(feed)


def test_a_render_to_stdout_writes_only_the_container_while_tensorrt_and_polygraphy_log(
    monkeypatch, clip_folder, capfdbinary, caplog
):
    import io

    import av
    from fake_trt import install

    from vlrt.cli import main
    from vlrt.render import engine_picker

    install(monkeypatch)
    real = engine_picker.build_engines
    monkeypatch.setattr(
        engine_picker, "build_engines", lambda *a, **k: {name: _Logs(e) for name, e in real(*a, **k).items()}
    )
    code = main(["render", str(clip_folder), "-o", "-", "--model", "demo", "--backend", "torch", "--device", "cpu",
                 "--max-frames", "3", "--steps", "4", "--denoising-strength", "0.5", "--loop-n", "1", "--output-format", "nut"])
    out, _ = capfdbinary.readouterr()
    assert code == 0
    # The warnings are kept, as records of vlrt's loggers (whose handler writes to standard error).
    shown = {(r.name, r.levelname, r.getMessage().split(":")[0]) for r in caplog.records}
    assert ("vlrt.tensorrt", "WARNING", "TensorRT") in shown
    assert any(r.name == "vlrt.polygraphy" and "Buffer dtype" in r.getMessage() for r in caplog.records)
    assert b"TRT" not in out and b"Input tensor" not in out and b"Loading bytes" not in out
    with av.open(io.BytesIO(out), format="nut") as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 3 and (frames[0].width, frames[0].height) == (64, 48)


# --- TensorRT builds and refits, with a fake tensorrt ------------------------------------------


def _dynamic_batch_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("latent", TensorProto.FLOAT16, ["batch", 4, 8, 8])
    y = helper.make_tensor_value_info("image", TensorProto.FLOAT16, ["batch", 4, 8, 8])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["latent"], ["image"])], "g", [x], [y])), path)
    return path


@pytest.mark.parametrize(("version", "refittable"), [("10.9.0", True), ("11.3.0", False), ("11.3.2", False), ("11.4.0", True)])
def test_unet_plans_are_refittable_except_on_tensorrt_11_3(monkeypatch, tmp_path, caplog, version, refittable):
    from fake_trt import install, polygraphy_trt_backend

    from vlrt.export.trt_build import build_plan

    install(monkeypatch, version=version)
    configs = polygraphy_trt_backend(monkeypatch)
    onnx_path = _dynamic_batch_onnx(tmp_path / "model.onnx")
    timing = tmp_path / "timing.cache"
    for component in (UNET, VAE_DECODER):
        build_plan(component, onnx_path, tmp_path / f"{component}.plan", max_batch=3, timing_cache=timing)
    unet, vae = configs
    assert unet["refittable"] is refittable and vae["refittable"] is False
    assert ("without REFIT" in caplog.text) == (not refittable)
    assert unet["network"]["strongly_typed"] and unet["save_timing_cache"] == str(timing)
    assert unet["profiles"][0]["latent"] == ((1, 4, 8, 8), (3, 4, 8, 8), (3, 4, 8, 8))
    assert (tmp_path / "unet.plan").read_bytes() == b"plan"


class _PlanRecorder:
    """Stands in for plan builds and refits: records which component got which, writes a plan file."""

    def __init__(self, monkeypatch, refit_fails: bool = False) -> None:
        from vlrt.engines import trt_engine
        from vlrt.export import trt_build
        from vlrt.render import engine_picker

        self.events: list[tuple[str, str]] = []
        self.timing: set[str] = set()
        self.checked: list[str] = []
        self.refit_fails = refit_fails
        monkeypatch.setattr(trt_build, "build_plan", self.build)
        monkeypatch.setattr(trt_engine, "refit_unet", self.refit)
        monkeypatch.setattr(engine_picker, "_load", lambda backend, component, *a: _Returns(component, torch.zeros(1)))
        monkeypatch.setattr(engine_picker, "check_engine", lambda engine, net: self.checked.append(engine.component))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def build(self, component, onnx_path, plan_path, *, max_batch, timing_cache=None):
        self.events.append(("build", component))
        self.timing.add(str(timing_cache))
        plan_path.write_bytes(b"built")

    def refit(self, base_plan, weights, plan_path):
        self.events.append(("refit", base_plan.parent.name.split("-")[1]))
        if self.refit_fails:
            raise VlrtError("refit is missing 3 weights")
        plan_path.write_bytes(b"refitted")


def _perturbed(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)


def _engines_of(model, tmp_path, version="10.9.0"):
    from vlrt.render.engine_picker import build_engines, sd_networks

    return build_engines(sd_networks(model, 16, 16), "trt", device=torch.device("cuda", 0), max_batch=2,
                         precision="fp32", engines_dir=tmp_path / "engines", log=lambda m: None)


@pytest.mark.parametrize(
    ("changed", "version", "refit_fails", "events"),
    [
        # another VAE (--vae): its plans were never refittable, so they are rebuilt
        ("vae", "10.9.0", False, [("build", "vae_encoder"), ("build", "vae_decoder")]),
        # another LoRA scale: the UNet's refittable plan is refitted
        ("unet", "10.9.0", False, [("refit", "unet")]),
        # a refit that fails falls back to a build
        ("unet", "10.9.0", True, [("refit", "unet"), ("build", "unet")]),
        # TensorRT 11.3 builds no refittable plans: rebuild
        ("unet", "11.3.0", False, [("build", "unet")]),
    ],
)
def test_only_the_unet_plan_is_refitted_and_a_failed_refit_builds(
    demo_model, tmp_path, monkeypatch, changed, version, refit_fails, events
):
    import copy

    from fake_trt import install

    install(monkeypatch, version=version)
    plans = _PlanRecorder(monkeypatch, refit_fails=refit_fails)
    _engines_of(demo_model, tmp_path, version)
    assert plans.events == [("build", "unet"), ("build", "vae_encoder"), ("build", "vae_decoder")]
    assert plans.checked == ["unet", "vae_encoder", "vae_decoder"]  # every fresh plan is compared with torch
    other = copy.deepcopy(demo_model)
    _perturbed(other.vae if changed == "vae" else other.unet, seed=4)
    plans.events.clear()
    plans.checked.clear()
    _engines_of(other, tmp_path, version)
    assert plans.events == events
    assert plans.checked == [c for c in ("unet", "vae_encoder", "vae_decoder") if c.startswith(changed)]
    (timing,) = plans.timing
    assert timing.endswith(f".timing-trt{version}-sm9.0.cache")  # one timing cache per TensorRT and GPU


def test_a_tiny_vae_gets_trt_plans_of_its_own_built_and_checked(demo_model, tmp_path, monkeypatch):
    """--vae with TAESD on TensorRT: its two halves are exported and built as the full VAE's are (no refit:
    VAE plans are not refittable), checked against torch, and cached beside the full VAE's entries."""
    from dataclasses import replace

    from fake_trt import install
    from test_tiny_vae import random_tiny_vae

    install(monkeypatch)
    plans = _PlanRecorder(monkeypatch)
    _engines_of(demo_model, tmp_path)
    plans.events.clear()
    plans.checked.clear()
    _engines_of(replace(demo_model, vae=random_tiny_vae()), tmp_path)
    assert plans.events == [("build", "vae_encoder"), ("build", "vae_decoder")]
    assert plans.checked == ["vae_encoder", "vae_decoder"]
    for component in ("vae_encoder", "vae_decoder"):
        entries = [p for p in (tmp_path / "engines").iterdir() if p.is_dir() and f"-{component}-" in p.name]
        assert len(entries) == 2 and all((p / "model.plan").read_bytes() == b"built" for p in entries)


def test_a_unet_exported_afresh_is_built_not_refitted(demo_model, tmp_path, monkeypatch):
    import copy

    from fake_trt import install

    from vlrt.export import reweight

    install(monkeypatch)
    plans = _PlanRecorder(monkeypatch)
    _engines_of(demo_model, tmp_path)
    other = copy.deepcopy(demo_model)
    _perturbed(other.unet, seed=5)
    monkeypatch.setattr(reweight, "reweight_onnx", lambda *a: False)  # its graph could not be re-weighted
    plans.events.clear()
    _engines_of(other, tmp_path)
    assert plans.events == [("build", "unet")]


def test_check_engine_refuses_an_engine_that_computes_something_else(demo_model):
    from vlrt.engines.torch_engine import TorchEngine
    from vlrt.render.engine_picker import check_engine, sd_networks

    net = next(n for n in sd_networks(demo_model, 16, 16) if n.component == VAE_DECODER)
    check_engine(TorchEngine(VAE_DECODER, net.module, 2, torch.device("cpu"), torch.float32), net)
    with pytest.raises(VlrtError, match="freshly built vae_decoder engine .* differs from torch"):
        check_engine(_Returns(VAE_DECODER, torch.zeros(2, 3, 16, 16)), net)


def test_the_fp16_copy_for_export_is_made_on_the_cpu_tensor_by_tensor(demo_model):
    """On a GPU a deep copy would first duplicate the fp32 weights there; the copy is built on the CPU."""
    from vlrt.engines.modules import UNetModule
    from vlrt.export.onnx_export import cpu_copy

    module = UNetModule(demo_model.unet)
    copied = cpu_copy(module, torch.float16)
    originals = dict(module.named_parameters())
    for name, p in copied.named_parameters():
        assert p.dtype == torch.float16 and p.device.type == "cpu" and not p.requires_grad
        assert torch.equal(p.float(), originals[name].detach().half().float())
        assert p.data_ptr() != originals[name].data_ptr()
    assert all(p.dtype == torch.float32 for p in module.parameters())  # the original is untouched


def test_ort_on_cuda_computes_on_a_torch_stream_without_exhaustive_cudnn_search(monkeypatch, tmp_path):
    import onnxruntime as ort

    from vlrt.engines import ort_engine

    asked = {}

    class Session:
        def __init__(self, path, sess_options, providers):
            asked["providers"] = providers

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    class Stream:
        cuda_stream = 94_000_123

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    path = _dynamic_batch_onnx(tmp_path / "model.onnx")
    ort_engine.load_session(path, torch.device("cuda", 1), stream=Stream())
    (cuda, options), cpu = asked["providers"]
    assert (cuda, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert options == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC", "user_compute_stream": "94000123"}


def test_unmarked_tests_see_no_gpu_nor_do_the_processes_they_start():
    import os

    from vlrt.render.pipeline import pick_device

    assert pick_device("auto").type == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


# --- the VAE's precision --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "memory_gib", "asked", "want"),
    [("cpu", 0, "auto", "fp16"), ("cuda", 80, "auto", "fp32"), ("cuda", 8, "auto", "fp16"), ("cuda", 80, "fp16", "fp16"),
     ("cpu", 0, "fp32", "fp32")],
)
def test_vae_runs_in_fp32_on_gpus_with_room_for_it(monkeypatch, device, memory_gib, asked, want):
    import types

    from vlrt.render.engine_picker import vae_precision_for

    props = types.SimpleNamespace(total_memory=memory_gib * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert vae_precision_for(torch.device(device), asked, "fp16") == want


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_vae_precision_applies_to_both_vae_halves_only(demo_model, tmp_path, backend):
    import copy

    from vlrt.render.engine_picker import build_engines, sd_networks

    model = copy.deepcopy(demo_model)  # the torch backend converts modules in place
    engines = build_engines(sd_networks(model, 16, 16), backend, device=torch.device("cpu"), max_batch=2,
                            precision="fp16", engines_dir=tmp_path, log=lambda m: None, vae_precision="fp32")
    if backend == "torch":
        dtypes = {name: next(e.module.parameters()).dtype for name, e in engines.items()}
        assert dtypes == {UNET: torch.float16, "vae_encoder": torch.float32, VAE_DECODER: torch.float32}
    else:
        folders = {name: e.path.parent.name for name, e in engines.items()}
        assert folders[UNET].endswith("-fp16")
        assert folders["vae_encoder"].endswith("-fp32") and folders[VAE_DECODER].endswith("-fp32")


def test_a_fresh_plan_that_differs_from_torch_is_refused_and_not_kept(demo_model, tmp_path, monkeypatch):
    from fake_trt import install

    from vlrt.render import engine_picker

    install(monkeypatch)
    _PlanRecorder(monkeypatch)
    monkeypatch.setattr(engine_picker, "check_engine", _refuse_vae_decoder)
    with pytest.raises(VlrtError, match="differs from torch"):
        _engines_of(demo_model, tmp_path)
    entries = sorted(p.name.split("-")[1] for p in (tmp_path / "engines").iterdir() if not p.name.startswith("."))
    assert entries == ["unet", "vae_encoder"]  # the decoder's entry is gone: the next run builds it again


def _refuse_vae_decoder(engine, net):
    if engine.component == VAE_DECODER:
        raise VlrtError("the freshly built vae_decoder engine differs from torch by 3.1")
