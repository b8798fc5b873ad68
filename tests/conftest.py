"""Shared fixtures: models are loaded once per session, clips are generated on the fly."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Engines built by tests go to a throwaway cache, never into the checkout's engines/ folder.
os.environ["VLRT_ENGINES"] = tempfile.mkdtemp(prefix="vlrt-test-engines-")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Tests compare with CPU references on shared CPU fixtures: on a CUDA machine, `--device auto`
    would silently run them in CUDA fp16. Only tests marked `gpu` or `trt` see the GPU (and the
    processes they start inherit no visible GPU either)."""
    if request.node.get_closest_marker("gpu") or request.node.get_closest_marker("trt"):
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def demo_model():
    from vlrt.model.loading import load_model

    return load_model("demo", torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny8_dir(tmp_path_factory) -> Path:
    """A second tiny model with other configs: VAE scale factor 8 and a different cross-attention size."""
    from tiny_sd import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny8") / "model", vae_blocks=4, cross_attention_dim=48, seed=3)


@pytest.fixture(scope="session")
def tiny8_model(tiny8_dir):
    from vlrt.model.loading import load_model

    return load_model(str(tiny8_dir), torch.device("cpu"))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL folder (tiny_sdxl.py)."""
    from tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


@pytest.fixture(scope="session")
def sdxl_model(sdxl_dir):
    from vlrt.model.loading import load_model

    return load_model(str(sdxl_dir), torch.device("cpu"))


def write_frames(folder: Path, frames: list[np.ndarray], pattern: str = "{:04d}.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / pattern.format(i + 1))
    return folder


def shot_frames(kind: int, count: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """`count` frames of one generated shot: a hue of its own and a slowly moving shape."""
    w, h = size
    frames = []
    hues = [(200, 40, 30), (10, 20, 110), (150, 255, 150), (255, 220, 0)]
    for i in range(count):
        picture = np.zeros((h, w, 3), np.uint8)
        picture[:] = hues[kind]
        picture[(kind % 2) :: 2 + kind, :] //= 2  # a texture of its own
        x = (2 * i) % (w - 10)
        picture[h // 3 : h // 3 + 10, x : x + 10] = 255 - np.array(hues[kind], np.uint8)
        frames.append(picture)
    return frames


def reference_scheduler(sampler: str, config):
    """The diffusers scheduler a reference pipeline runs for `sampler` (vlrt's sampler table), from `config`."""
    from vlrt.model.samplers import SAMPLERS

    cls, overrides = SAMPLERS[sampler]
    return cls.from_config(config, **overrides)


def read_frames(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(folder).glob("*.png"))]


@pytest.fixture
def clip_folder(tmp_path) -> Path:
    """Six 64×48 frames of the sample clip as a PNG folder."""
    from vlrt.demo.clip import sample_frames

    return write_frames(tmp_path / "clip", sample_frames(6, (64, 48)))
