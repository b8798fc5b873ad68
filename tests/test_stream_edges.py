"""The ends of the stream: clips shorter than every window still finish, and batching never changes them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import read_frames, write_frames

from vlrt.demo.clip import sample_frames
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings


@pytest.mark.parametrize("frames", [1, 2])
def test_short_clips_finish_with_every_stage_on_and_batching_does_not_matter(frames, demo_model, tmp_path):
    """Windows (5 temporal taps, FastDVDNet's 5) wider than the clip, 2 passes, 2 samples a frame."""
    inputs = write_frames(tmp_path / "in", sample_frames(frames, (32, 32)))
    results = {}
    for max_batch in (1, 3):
        settings = build_settings(overrides=dict(
            model="demo", backend="torch", loop_n=2, steps=4, denoising_strength=0.5, cfg_scale=4.0, seed=3,
            temporal_superimpose_alpha_list="0.1,0.2,0.4,0.2,0.1", batch_size=2, fix_seed=False,
            video_post_process_method="fastdvdnet", max_batch=max_batch,
        ))
        result = render(settings, str(inputs), str(tmp_path / f"out{max_batch}") + "/", quiet=True, model=demo_model)
        assert result.frames == frames
        results[max_batch] = read_frames(tmp_path / f"out{max_batch}")
    for a, b in zip(results[1], results[3], strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(results[1][0].astype(int) - read_frames(inputs)[0].astype(int)).mean() > 2
