"""Export at the real SD 1.5 sizes (random weights): the over-2-GB external-data path, and ORT = torch.

Slow (minutes) and memory-hungry (about 15 GB): `pytest -m slow tests/test_export_sd15.py -s`
prints the timings. The UNet is 859.5 M parameters, 3.4 GB in fp32, so its ONNX must use
external data; exports run at 256x256 (latent 32x32) to keep the CPU work short.
"""

from __future__ import annotations

import gc
import resource
import time
from pathlib import Path

import onnx
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from vlrt.engines.base import SDXL_CONDITIONING, UNET, VAE_DECODER, VAE_ENCODER, unet_names
from vlrt.engines.modules import UNetModule, VaeDecoderModule, VaeEncoderModule
from vlrt.engines.ort_engine import OrtEngine
from vlrt.export.manifest import ONNX_DATA_FILE, ONNX_FILE, model_hash
from vlrt.export.onnx_export import export_onnx
from vlrt.model.checkpoints import CONFIGS

pytestmark = pytest.mark.slow

IMAGE, LATENT, TOKENS = 256, 32, 77
CPU = torch.device("cpu")


class Clock:
    """Named wall-clock laps, printed at the end of a test."""

    def __init__(self, title: str) -> None:
        self.title, self.laps, self.last = title, [], time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append(f"{name} {now - self.last:.1f} s")
        self.last = now

    def report(self, extra: str) -> None:
        print(f"\n{self.title}: " + ", ".join(self.laps) + f"; {extra}")


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = (got - want).abs().max().item()
    return diff, diff / max(want.abs().max().item(), 1e-6)


def test_sd15_unet_external_data_and_ort_matches_torch(tmp_path: Path):
    clock = Clock("SD 1.5 UNet, 256x256")
    torch.manual_seed(0)
    module = UNetModule(UNet2DConditionModel(sample_size=64, cross_attention_dim=768)).eval()
    params = sum(p.numel() for p in module.parameters())
    assert 859e6 < params < 860e6
    clock.lap("build")
    digest = model_hash(module)
    assert len(digest) == 64
    clock.lap("model_hash")

    g = torch.Generator().manual_seed(1)
    feed = {
        "sample": torch.randn(2, 4, LATENT, LATENT, generator=g),
        "timestep": torch.tensor([999.0, 421.75]),
        "encoder_hidden_states": torch.randn(2, TOKENS, 768, generator=g),
    }
    with torch.no_grad():
        want = module(**feed)
    clock.lap("torch forward (batch 2)")

    fp32 = tmp_path / "fp32" / ONNX_FILE
    export_onnx(UNET, module, feed, fp32)
    clock.lap("export fp32")
    assert sorted(p.name for p in fp32.parent.iterdir()) == [ONNX_FILE, ONNX_DATA_FILE]  # one data file
    assert (fp32.parent / ONNX_DATA_FILE).stat().st_size > 3.4e9 and fp32.stat().st_size < 50e6

    fp16 = tmp_path / "fp16" / ONNX_FILE
    export_onnx(UNET, module, feed, fp16, precision="fp16")
    clock.lap("export fp16")
    fp16_files = sorted(p.name for p in fp16.parent.iterdir())
    fp16_bytes = sum(p.stat().st_size for p in fp16.parent.iterdir())
    assert 1.70e9 < fp16_bytes < 1.75e9
    graph = onnx.load(str(fp16), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    assert types["timestep"] == onnx.TensorProto.FLOAT and types["sample"] == onnx.TensorProto.FLOAT16
    del module, graph
    gc.collect()

    engine = OrtEngine(UNET, fp32, max_batch=2, device=CPU)
    clock.lap("ORT session")
    got = engine(**feed)["noise_pred"]
    clock.lap("ORT run (batch 2)")
    diff, rel = relative_diff(got, want)
    clock.report(f"ORT vs torch max |diff| {diff:.2e} (relative to max |out| {rel:.2e}); fp16 files {fp16_files}")
    assert rel <= 1e-4


def test_sd15_vae_exports_and_ort_matches_torch(tmp_path: Path):
    clock = Clock("SD 1.5 VAE, 256x256")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ).eval()
    assert 83e6 < sum(p.numel() for p in vae.parameters()) < 84e6
    clock.lap("build")
    g = torch.Generator().manual_seed(2)
    cases = [
        (VAE_ENCODER, VaeEncoderModule(vae), {"image": torch.rand(2, 3, IMAGE, IMAGE, generator=g) * 2 - 1}),
        (VAE_DECODER, VaeDecoderModule(vae), {"latent": torch.randn(2, 4, LATENT, LATENT, generator=g)}),
    ]
    diffs = []
    for component, module, feed in cases:
        path = tmp_path / component / ONNX_FILE
        export_onnx(component, module, feed, path)
        clock.lap(f"export {component}")
        with torch.no_grad():
            want = module(**feed)
        (got,) = OrtEngine(component, path, max_batch=2, device=CPU)(**feed).values()
        clock.lap(f"torch + ORT {component}")
        diff, rel = relative_diff(got, want)
        diffs.append(f"{component} max |diff| {diff:.2e} (relative {rel:.2e})")
        assert got.shape == want.shape and rel <= 1e-4
    clock.report("; ".join(diffs))


def peak_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def test_sdxl_unet_exports_within_its_own_size_and_ort_matches_torch(tmp_path: Path):
    """The real SDXL UNet (2.57 B parameters, 10.3 GB in fp32) exports on a machine that holds it about
    once more: the exporter traces without weights and writes them tensor by tensor, so the export's peak
    stays under 1.6 times the weights (the traced-with-weights export held about three times)."""
    clock = Clock("SDXL UNet, 256x256")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "sdxl" / "unet"))
    module = UNetModule(unet).eval()
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    assert 2567e6 < sum(p.numel() for p in module.parameters()) < 2568e6
    clock.lap(f"build ({peak_gb():.1f} GB peak)")
    g = torch.Generator().manual_seed(1)
    feed = {
        "sample": torch.randn(2, 4, LATENT, LATENT, generator=g),
        "timestep": torch.tensor([999.0, 421.75]),
        "encoder_hidden_states": torch.randn(2, TOKENS, 2048, generator=g),
        "text_embeds": torch.randn(2, 1280, generator=g),
        "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]] * 2),
    }
    with torch.no_grad():
        want = module(**feed)
    clock.lap("torch forward (batch 2)")

    path = tmp_path / ONNX_FILE
    names = unet_names(SDXL_CONDITIONING)
    export_onnx(UNET, module, feed, path, names=names)
    export_peak = peak_gb()
    clock.lap(f"export fp32 ({export_peak:.1f} GB peak)")
    assert sorted(p.name for p in tmp_path.iterdir()) == [ONNX_FILE, ONNX_DATA_FILE]
    assert (tmp_path / ONNX_DATA_FILE).stat().st_size >= weights * 0.99 and path.stat().st_size < 50e6
    assert export_peak < 1.6 * weights / 2**30
    del module, unet
    gc.collect()

    engine = OrtEngine(UNET, path, max_batch=2, device=CPU, names=names)
    clock.lap("ORT session")
    got = engine(**feed)["noise_pred"]
    clock.lap(f"ORT run (batch 2) ({peak_gb():.1f} GB peak)")
    diff, rel = relative_diff(got, want)
    clock.report(f"ORT vs torch max |diff| {diff:.2e} (relative to max |out| {rel:.2e}); weights {weights / 1e9:.2f} GB")
    assert rel <= 1e-4
