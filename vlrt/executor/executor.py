"""Runs the network work of every ready job together, on its own thread.

Stages never call an engine. They submit jobs; each round moves every pending job one phase on,
with one batched engine call per phase: the VAE encodes of all new jobs, then one UNet
evaluation of every job that is denoising (samples of different frames, loop passes, batch items
and both CFG halves, each at its own timestep), then the VAE decodes of the jobs that finished.
Engines split the rows into calls of at most their `max_batch`. Since every random draw belongs
to its job, the batch never changes what a job computes (up to float rounding).

Overlap (why a thread, and why rounds are collected late): rounds run on the executor's engine
thread, so while the engines work the driver's thread does the host's share (decoding, blends of
other frames, starting new jobs, encoding finished frames). Each `run_once()` queues the next round
and then, if two are queued, waits for the older one. A round's jobs are those of the previous
round that are not finished (the engine thread carries them over) and those the stages submitted
before the `run_once` that queued it: fixed by the order of the driver's calls, never by how long
anything took, so the batches, and the frames, do not depend on timing.
Nothing on the engine thread waits for the device's current round: engine calls and the sampler's
tensor ops are queued (on a GPU), each round ends by marking the work queued so far
(`EngineSet.mark`) and then waits for the mark of the round before (`EngineSet.wait`, which also
reads the engines' non-finite checks). So the device always holds a round's work while the host
prepares the next, and a round's finished jobs are handed to the stages (`job.done`) at the end of
the next round, once the device has done them and their outputs were checked. That costs latency
only: a job's frame reaches the stages one round later.
Engine calls outside jobs (FastDVDNet's blocks, `run`) go through the same thread, after the
rounds queued, so one engine thread owns the device's work.
"""

from __future__ import annotations

from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch

from vlrt.engines.base import EngineSet
from vlrt.executor.control import ControlRunner
from vlrt.executor.jobs import Img2ImgJob, Phase
from vlrt.model import sampler_steps
from vlrt.model.conditioning import Conditioning


class Executor:
    """Owns the engines and the thread that runs them; advances submitted jobs in batched rounds."""

    def __init__(self, engines: EngineSet, control: ControlRunner | None = None) -> None:
        """With `control`, the UNet engine takes ControlNet residuals, which `control` computes per round."""
        self.engines = engines
        self.control = control
        self.jobs: list[Img2ImgJob] = []  # submitted, not yet given to a round
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlrt-engines")
        self._queued: deque[Future[list[Img2ImgJob]]] = deque()  # queued or running, oldest first
        self._in_flight = 0  # given to rounds and not yet collected finished
        self.rounds = 0  # rounds queued so far: the stages' clock (a stage may pace its starts by it)
        self._carry: list[Img2ImgJob] = []  # the engine thread's own: the last round's unfinished jobs
        self._last: tuple[list, list[Img2ImgJob]] = ([], [])  # the engine thread's own: the last round's mark and finished jobs

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Let the rounds queued end (their errors are not raised again) and stop the engine thread."""
        self._thread.shutdown(wait=True)

    def submit(self, job: Img2ImgJob) -> None:
        if not job.done:
            self.jobs.append(job)

    def run(self, component: str, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batched call of a network that is not part of an img2img job (FastDVDNet's blocks),
        on the engine thread after the rounds queued."""
        return self._thread.submit(self.engines[component], **feed).result()

    @property
    def pending(self) -> int:
        return len(self.jobs) + self._in_flight

    def run_once(self) -> None:
        """Queue the next round (the jobs submitted since the last call, with every unfinished one);
        with two rounds queued, collect the older. An engine's error is raised here, on the driver's thread."""
        if self.jobs or self._in_flight:
            new, self.jobs = self.jobs, []
            self._in_flight += len(new)
            self._queued.append(self._thread.submit(self._round, new))
            self.rounds += 1
        if len(self._queued) > 1:
            self._collect()

    def _collect(self) -> None:
        """Wait for the oldest round and mark the jobs it finished done."""
        finished = self._queued.popleft().result()
        for job in finished:
            job.done = True
        self._in_flight -= len(finished)

    def _round(self, new: list[Img2ImgJob]) -> list[Img2ImgJob]:
        """On the engine thread: the carried jobs and `new` one phase on, queued on the device; then wait
        for the round before and return the jobs it finished."""
        jobs = self._carry + new
        _advance(self.engines, self.control, jobs)
        self._carry = [job for job in jobs if job.phase is not Phase.DONE]
        (mark, finished), self._last = self._last, (self.engines.mark(), [job for job in jobs if job.phase is Phase.DONE])
        self.engines.wait(mark)
        return finished


def _advance(engines: EngineSet, control: ControlRunner | None, jobs: list[Img2ImgJob]) -> None:
    """One round's work, queued on the engine thread: every job one phase on (decode, then denoise, then encode)."""
    by_phase: dict[Phase, list[Img2ImgJob]] = defaultdict(list)
    for job in jobs:
        by_phase[job.phase].append(job)
    if by_phase[Phase.DECODE]:
        _decode(engines, by_phase[Phase.DECODE])
    if by_phase[Phase.DENOISE]:
        _denoise(engines, control, by_phase[Phase.DENOISE])
    if by_phase[Phase.ENCODE]:
        _encode(engines, by_phase[Phase.ENCODE])


def _encode(engines: EngineSet, jobs: list[Img2ImgJob]) -> None:
    """One encoder call per image size for every image of the jobs (an inpainting model's masked images too)."""
    for group in _by_shape(jobs, lambda j: tuple(j.image.shape)):
        inputs = [j.encoder_inputs() for j in group]
        moments = engines.vae_encoder(image=torch.stack([image for images in inputs for image in images]))["moments"]
        start = 0
        for job, images in zip(group, inputs):
            job.take_moments(moments[start : start + len(images)])
            start += len(images)


def _denoise(engines: EngineSet, control: ControlRunner | None, jobs: list[Img2ImgJob]) -> None:
    for group in _by_shape(jobs, lambda j: (tuple(j.latents.shape), j.cond.shapes, j.traj is None)):
        if group[0].traj is None:
            inputs = [j.unet_input() for j in group]
            feed = dict(
                sample=torch.cat([i[0] for i in inputs]),
                timestep=torch.cat([i[1] for i in inputs]),
                **_rows([i[2] for i in inputs]),
            )
        else:
            latents = torch.cat([j.latents for j in group]).float()
            rows = [k for k, j in enumerate(group) for _ in range(j.rows)]
            trajs = [group[k].traj for k in rows]
            feed = dict(
                sample=sampler_steps.scale_model_input(trajs, latents[rows]),
                timestep=sampler_steps.model_timesteps(trajs, latents.device),
                **_rows([j.embeddings for j in group]),
            )
        if control is not None:
            feed.update(control.residuals(group, **feed))
        feed["sample"] = _with_conditioning(group, feed["sample"])
        pred = engines.unet(**feed)["noise_pred"]
        if group[0].traj is None:
            start = 0
            for job in group:
                job.take_noise_pred(pred[start : start + job.rows])
                start += job.rows
        else:
            _step_together(group, latents, pred.float())


def _with_conditioning(jobs: list[Img2ImgJob], sample: torch.Tensor) -> torch.Tensor:
    """The UNet's sample: the jobs' latent rows, followed on channels by an inpainting model's mask and
    masked-image latents (the same for both CFG rows of a job)."""
    if jobs[0].conditioning is None:
        return sample
    extra = torch.cat([j.conditioning for j in jobs for _ in range(j.rows)])
    return torch.cat([sample, extra.to(sample.dtype)], dim=1)


def _rows(conditionings: list[Conditioning]) -> Conditioning:
    """The jobs' conditioning rows stacked per input (text embeddings; SDXL's pooled and sizes too)."""
    return {name: torch.cat([c[name] for c in conditionings]) for name in conditionings[0]}


def _step_together(jobs: list[Img2ImgJob], latents: torch.Tensor, pred: torch.Tensor) -> None:
    """One sampler step of every job at once: CFG mixed over the batch, then one batched step per
    sampler rule (vlrt.model.sampler_steps), each job's fresh noise from its own generator."""
    rows = torch.tensor([j.rows for j in jobs], device=pred.device)
    ends = rows.cumsum(0)
    cond, uncond = pred[ends - 1], pred[ends - rows]  # a job without CFG has one row: both are it
    scale = torch.tensor([j.guidance for j in jobs], dtype=torch.float32, device=pred.device).view(-1, *[1] * (pred.dim() - 1))
    cfg = torch.tensor([j.cfg for j in jobs], device=pred.device).view_as(scale)
    guided = torch.where(cfg, uncond + scale * (cond - uncond), cond)
    stepped = torch.empty_like(latents)
    rules: dict[object, list[int]] = {}
    for k, job in enumerate(jobs):
        rules.setdefault(job.traj.group, []).append(k)
    for members in rules.values():
        trajs = [jobs[k].traj for k in members]
        noise = sampler_steps.draw_noise(trajs, [jobs[k].generator for k in members], tuple(latents.shape[1:]), latents.device)
        stepped[members] = sampler_steps.step(trajs, guided[members], latents[members], noise)
    for k, job in enumerate(jobs):
        job.advanced(stepped[k : k + 1])


def _decode(engines: EngineSet, jobs: list[Img2ImgJob]) -> None:
    for group in _by_shape(jobs, lambda j: tuple(j.latents.shape)):
        images = engines.vae_decoder(latent=torch.stack([j.decoder_input() for j in group]))["image"]
        for job, image in zip(group, images):
            job.take_image(image)


def _by_shape(jobs: list[Img2ImgJob], key) -> list[list[Img2ImgJob]]:
    """Jobs grouped so that each group's tensors stack (same sizes), in submission order."""
    groups: dict[object, list[Img2ImgJob]] = {}
    for job in jobs:
        groups.setdefault(key(job), []).append(job)
    return list(groups.values())
