"""The executor: rounds on their own thread, batches fixed by submissions (not timing), one sampler step per round."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from conftest import read_frames

from vlrt.engines.base import UNET, VAE_DECODER, VAE_ENCODER, Engine, EngineSet
from vlrt.executor.executor import Executor
from vlrt.executor.jobs import Img2ImgJob
from vlrt.model import sampler_steps
from vlrt.model.conditioning import StepEmbeddings
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings
from vlrt.tools.occupancy import ModelledEngine


class _GatedEngine(ModelledEngine):
    """A stand-in that does not return until the test opens its gate."""

    def __init__(self, component: str) -> None:
        super().__init__(component, (0.0, 0.0), 16, scale=2, channels=4)
        self.gate = threading.Event()

    def _run(self, feed):
        assert self.gate.wait(10)
        return super()._run(feed)


def _job(seed: int) -> Img2ImgJob:
    text = StepEmbeddings((4,), ({"encoder_hidden_states": torch.zeros(1, 4, 8)},))
    return Img2ImgJob(
        torch.full((16, 16, 3), 128, dtype=torch.uint8), text, text, guidance=1.0,
        sampler_name="Euler", scheduler_config={"num_train_timesteps": 1000}, steps=4, strength=0.5, seed=seed,
        subseed=0, subseed_strength=0.0, scaling_factor=1.0,
    )


def test_a_round_runs_while_the_driver_goes_on_and_its_results_show_only_when_collected():
    engines = EngineSet(**{c: _GatedEngine(c) for c in (UNET, VAE_ENCODER, VAE_DECODER)})
    with Executor(engines) as executor:
        jobs = [_job(1), _job(2)]
        for job in jobs:
            executor.submit(job)
        started = time.perf_counter()
        executor.run_once()  # queues the encode round on the engine thread: the gate keeps it there
        assert time.perf_counter() - started < 5 and executor.pending == 2
        late = _job(3)
        executor.submit(late)  # joins the next round, whatever the engine thread is doing
        for component in (UNET, VAE_ENCODER, VAE_DECODER):
            engines[component].gate.set()
        rounds = 1
        while any(not j.done for j in jobs):
            executor.run_once()
            rounds += 1
        # encode, 2 steps (4 × 0.5), decode, then the round that waits for the decode on the device and
        # hands the jobs over, then the call that collects that round
        assert rounds == 1 + 2 + 1 + 1 + 1
        assert not late.done  # it started a round later
        while not late.done:
            executor.run_once()
        assert all(j.result.shape == (16, 16, 3) for j in [*jobs, late])


def test_one_sampler_step_call_advances_every_job_of_a_round(demo_model, clip_folder, tmp_path, monkeypatch):
    calls: list[int] = []
    step = sampler_steps.step
    monkeypatch.setattr(sampler_steps, "step", lambda trajs, *a: (calls.append(len(trajs)), step(trajs, *a))[1])
    settings = build_settings(overrides=dict(model="demo", backend="torch", loop_n=2, steps=4, denoising_strength=0.5,
                                             cfg_scale=5.0, seed=3, sampler_name="Euler a", max_batch=16,
                                             temporal_superimpose_alpha_list="0.2,0.6,0.2"))
    render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=demo_model)
    frames = len(read_frames(clip_folder))
    assert sum(calls) == frames * 2 * 2  # every job's 2 steps (4 × 0.5), in each of 2 passes
    assert max(calls) > 1 and len(calls) < sum(calls)  # rows of several jobs per call


def test_frames_do_not_depend_on_engine_timing(demo_model, clip_folder, tmp_path):
    """The same render with engines that sleep at random (a busy device) gives the same bytes."""
    settings = build_settings(overrides=dict(model="demo", backend="torch", loop_n=2, steps=4, denoising_strength=0.5,
                                             seed=5, max_batch=4, temporal_superimpose_alpha_list="0.2,0.6,0.2"))
    render(settings, str(clip_folder), str(tmp_path / "a") + "/", quiet=True, model=demo_model)

    class Jittery(Engine):
        def __init__(self, inner: Engine, seed: int) -> None:
            super().__init__(inner.component, inner.max_batch, inner.device)
            self.inner, self.rng = inner, np.random.default_rng(seed)

        def _run(self, feed):
            time.sleep(float(self.rng.uniform(0, 0.02)))
            return self.inner._run(feed)

    from vlrt.render.engine_picker import open_engines

    base = open_engines("torch", model=demo_model, denoiser=None, device=torch.device("cpu"), height=48, width=64,
                        max_batch=4, precision="fp32", engines_dir=tmp_path / "engines", log=lambda _: None)
    jittery = EngineSet(**{c: Jittery(getattr(base, c), i) for i, c in enumerate((UNET, VAE_ENCODER, VAE_DECODER))})
    render(settings, str(clip_folder), str(tmp_path / "b") + "/", quiet=True, model=demo_model, engines=jittery)
    for a, b in zip(read_frames(tmp_path / "a"), read_frames(tmp_path / "b"), strict=True):
        assert np.array_equal(a, b)
