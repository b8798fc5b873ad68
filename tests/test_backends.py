"""Backends and batching must not change the frames."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import read_frames

from vlrt.cli import main
from vlrt.engines.trt_engine import trt_available
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings


def _render(model, folder, out, **overrides):
    settings = build_settings(
        overrides=dict(model=str(model.path), loop_n=2, steps=6, denoising_strength=0.5, cfg_scale=5.0, seed=9,
                       temporal_superimpose_alpha_list="0.2,0.6,0.2", batch_size=2, superimpose_alpha=0.5, **overrides)
    )
    result = render(settings, str(folder), str(out) + "/", quiet=True, model=model)
    return read_frames(out), result


def _max_diff(a, b):
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("which", ["demo", "tiny8"])
def test_ort_renders_the_same_frames_as_torch(which, request, clip_folder, tmp_path):
    model = request.getfixturevalue(f"{which}_model")
    torch_frames, _ = _render(model, clip_folder, tmp_path / "torch", backend="torch")
    ort_frames, result = _render(model, clip_folder, tmp_path / "ort", backend="ort")
    assert len(ort_frames) == len(torch_frames) == 6
    assert _max_diff(ort_frames, torch_frames) <= 3
    assert result.engine_calls["unet"] > 0


def test_batching_does_not_change_the_frames(demo_model, clip_folder, tmp_path):
    batched, on = _render(demo_model, clip_folder, tmp_path / "on", backend="torch", max_batch=16)
    single, off = _render(demo_model, clip_folder, tmp_path / "off", backend="torch", max_batch=1)
    assert _max_diff(batched, single) <= 1
    # The batched run really batched: many fewer UNet calls for the same work.
    assert off.engine_calls["unet"] >= 4 * on.engine_calls["unet"]


@pytest.mark.skipif(trt_available()[0], reason="TensorRT can run here")
def test_backend_trt_without_tensorrt_says_how_to_get_it(clip_folder, tmp_path, capsys):
    code = main(["render", str(clip_folder), "-o", str(tmp_path / "o.mp4"), "--model", "demo", "--backend", "trt", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err
    assert "--backend trt is not available" in err and "pip install" in err and "--backend ort" in err
    assert not (tmp_path / "o.mp4").exists()
