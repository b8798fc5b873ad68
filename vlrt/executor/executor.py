"""Runs the network work of every ready job together.

Stages never call an engine. They submit jobs; each `run_once()` moves every pending job one
phase on, with one batched engine call per phase: the VAE encodes of all new jobs, then one UNet
evaluation of every job that is denoising (samples of different frames, loop passes, batch items
and both CFG halves, each at its own timestep), then the VAE decodes of the jobs that finished.
Engines split the rows into calls of at most their `max_batch`. Since every random draw belongs
to its job, the batch never changes what a job computes (up to float rounding).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from vlrt.engines.base import EngineSet
from vlrt.executor.control import ControlRunner
from vlrt.executor.jobs import Img2ImgJob, Phase


class Executor:
    """Owns the engines; advances submitted jobs in batches."""

    def __init__(self, engines: EngineSet, control: ControlRunner | None = None) -> None:
        """With `control`, the UNet engine takes ControlNet residuals, which `control` computes per round."""
        self.engines = engines
        self.control = control
        self.jobs: list[Img2ImgJob] = []

    def submit(self, job: Img2ImgJob) -> None:
        if not job.done:
            self.jobs.append(job)

    def run(self, component: str, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batched call of a network that is not part of an img2img job (FastDVDNet's blocks)."""
        return self.engines[component](**feed)

    @property
    def pending(self) -> int:
        return len(self.jobs)

    def run_once(self) -> None:
        """Advance every pending job by one phase (decode, then denoise, then encode)."""
        by_phase: dict[Phase, list[Img2ImgJob]] = defaultdict(list)
        for job in self.jobs:
            by_phase[job.phase].append(job)
        if by_phase[Phase.DECODE]:
            self._decode(by_phase[Phase.DECODE])
        if by_phase[Phase.DENOISE]:
            self._denoise(by_phase[Phase.DENOISE])
        if by_phase[Phase.ENCODE]:
            self._encode(by_phase[Phase.ENCODE])
        self.jobs = [job for job in self.jobs if not job.done]

    def _encode(self, jobs: list[Img2ImgJob]) -> None:
        for group in _by_shape(jobs, lambda j: j.image.shape):
            moments = self.engines.vae_encoder(image=torch.stack([j.encoder_input() for j in group]))["moments"]
            for job, m in zip(group, moments):
                job.take_moments(m)

    def _denoise(self, jobs: list[Img2ImgJob]) -> None:
        for group in _by_shape(jobs, lambda j: (tuple(j.latents.shape), tuple(j.cond.shape))):
            inputs = [j.unet_input() for j in group]
            feed = dict(
                sample=torch.cat([i[0] for i in inputs]),
                timestep=torch.cat([i[1] for i in inputs]),
                encoder_hidden_states=torch.cat([i[2] for i in inputs]),
            )
            if self.control is not None:
                feed.update(self.control.residuals(group, **feed))
            pred = self.engines.unet(**feed)["noise_pred"]
            start = 0
            for job in group:
                job.take_noise_pred(pred[start : start + job.rows])
                start += job.rows

    def _decode(self, jobs: list[Img2ImgJob]) -> None:
        for group in _by_shape(jobs, lambda j: tuple(j.latents.shape)):
            images = self.engines.vae_decoder(latent=torch.stack([j.decoder_input() for j in group]))["image"]
            for job, image in zip(group, images):
                job.take_image(image)


def _by_shape(jobs: list[Img2ImgJob], key) -> list[list[Img2ImgJob]]:
    """Jobs grouped so that each group's tensors stack (same sizes), in submission order."""
    groups: dict[object, list[Img2ImgJob]] = {}
    for job in jobs:
        groups.setdefault(key(job), []).append(job)
    return list(groups.values())
