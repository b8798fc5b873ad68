"""One img2img sample as a state machine the executor advances a phase at a time.

The job reproduces diffusers' `StableDiffusionImg2ImgPipeline` (for SDXL its
`StableDiffusionXLImg2ImgPipeline`) for one sample: the posterior
sample and the initial noise come from the sample's own generator (in that order), the
scheduler starts at `int(steps * strength)` steps from the end, CFG mixes the unconditional and
conditional predictions, and the decoded image is rounded to 8 bits the same way (or truncated, as
the WebUI does, under `blend_rounding = floor`, the extension-parity mode). What differs is
only who runs the networks: the executor batches the rows of many jobs into one engine call.

An inpainting model (a 9-channel UNet) follows diffusers' `StableDiffusionInpaintPipeline` instead:
the UNet takes the latents, the mask at latent size (nearest) and the latents of the masked image
(the init image with the pixels to repaint set to 0, mid grey), the same 5 extra channels in both
CFG rows; the masked image is encoded after the initial noise is drawn, and the unmasked latents are
not put back at each step (the model itself keeps them). Without a mask the whole frame is
repainted: a mask of ones, a masked image of zeros, as both diffusers (with a white mask) and the
WebUI (its img2img conditioning for inpainting models) give it.

Everything a job holds lives on the render device: the init image (a uint8 tensor), latents,
the scheduler's tensors and the decoded result (uint8 again, converted there). Only the random
draws are made on the CPU, from the job's own generator, and moved to the device, so they are
the same on every backend.

Threads: the executor advances jobs on its engine thread (`phase`, `latents`, `result`); the
stages read only `done`, which the executor sets on their thread when it collects a finished
round, so what a stage sees never depends on timing.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from vlrt.executor.control import ControlInput
from vlrt.executor.noise import generator, variation_noise
from vlrt.image.blend import ROUND, quantise
from vlrt.image.inpaint import LATENT_NOISE, LATENT_NOTHING, ORIGINAL
from vlrt.model.conditioning import Conditioning, StepEmbeddings
from vlrt.model.sampler_steps import add_noise, plan
from vlrt.model.samplers import make_scheduler


class Phase(Enum):
    ENCODE = "encode"
    DENOISE = "denoise"
    DECODE = "decode"
    DONE = "done"


def image_to_tensor(image: torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) to float32 (3, H, W) in [-1, 1], as diffusers' image processor does, on the image's device."""
    return image.permute(2, 0, 1).float().div(255.0).mul(2.0).sub(1.0)


def tensor_to_image(image: torch.Tensor, rounding: str = ROUND) -> torch.Tensor:
    """float (3, H, W) in [-1, 1] to uint8 (H, W, 3) on its device: rounded as diffusers' image
    processor does, or with `floor` truncated as the WebUI does (`(255 * x).astype(uint8)`)."""
    x = (image.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0)
    return quantise(x * 255, rounding)


class Img2ImgJob:
    """One sample of one frame of one loop pass, from init image to SD output."""

    def __init__(
        self,
        image: torch.Tensor,
        cond: StepEmbeddings,
        uncond: StepEmbeddings,
        guidance: float,
        sampler_name: str,
        scheduler_config: dict[str, Any],
        steps: int,
        strength: float,
        seed: int,
        subseed: int,
        subseed_strength: float,
        scaling_factor: float,
        shift_factor: float = 0.0,
        latent_mask: np.ndarray | torch.Tensor | None = None,
        fill: str = ORIGINAL,
        control: tuple[ControlInput, ...] = (),
        rounding: str = ROUND,
        posterior: bool = True,
        inpainting_model: bool = False,
        pixel_mask: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """`cond` and `uncond` are the prompt's and negative prompt's UNet inputs per sampling step, of one
        shape (`Model.encode_pair`). `control` holds the job's ControlNet units (vlrt.executor.control), in unit order;
        `rounding` how the decoded image becomes 8 bits (`tensor_to_image`).
        `posterior` False for a tiny VAE (TAESD), whose encoder gives the latents themselves: as in
        diffusers' pipelines nothing is sampled, so the generator's first draw is the initial noise.
        `latent_mask` (latent-sized, 1 = SD may change it) makes this an inpainting job whose
        other latents follow the init image's noising trajectory; `fill` is what the masked
        latents start from (see `vlrt.image.inpaint`).
        `inpainting_model` for a 9-channel UNet, which takes `pixel_mask` ((H, W) of the image, 1 = repaint;
        None repaints everything) and the masked image's latents as extra channels (see the module's docstring)."""
        self.image = image
        self.cond, self.uncond = cond, uncond
        self.guidance = guidance
        self.cfg = guidance > 1.0
        self.generator = generator(seed)
        self.subseed = subseed
        self.subseed_strength = subseed_strength
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.posterior = posterior
        self.device = image.device
        # The executor steps jobs with a trajectory together (vlrt.model.sampler_steps); a sampler
        # without a batched rule keeps diffusers' scheduler, stepped per job.
        self.traj = plan(sampler_name, scheduler_config, steps, strength, self.device)
        self.scheduler: SchedulerMixin | None = None
        if self.traj is not None:
            self.timesteps = self.traj.timesteps
        else:
            self.scheduler = scheduler = make_scheduler(sampler_name, scheduler_config, steps)
            init_steps = min(int(steps * strength), steps)
            t_start = max(steps - init_steps, 0)
            self.timesteps = scheduler.timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            takes_generator = "generator" in inspect.signature(scheduler.step).parameters
            self.step_kwargs = {"generator": self.generator} if takes_generator else {}
        self.edit = None if latent_mask is None else torch.as_tensor(latent_mask).to(self.device)[None, None]
        self.keep_unmasked = self.edit is not None and not inpainting_model
        self.pixel_mask: torch.Tensor | None = None
        if inpainting_model:
            mask = torch.ones(image.shape[:2]) if pixel_mask is None else torch.as_tensor(pixel_mask)
            self.pixel_mask = mask.to(self.device, torch.float32)
        self.conditioning: torch.Tensor | None = None  # an inpainting model's extra UNet channels [1, 5, h, w]
        self.fill = fill
        self.control = control
        self.rounding = rounding
        self.init_latents: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None
        self.index = 0
        self.latents: torch.Tensor | None = None
        self.result: torch.Tensor | None = None
        # With no sampling step left (strength too low for the step count) the init image is the result.
        self.phase = Phase.ENCODE if len(self.timesteps) else Phase.DONE
        self.done = self.phase is Phase.DONE
        if self.done:
            self.result = image

    # --- ENCODE ---
    def encoder_inputs(self) -> list[torch.Tensor]:
        """The init image; for an inpainting model also the masked image (the pixels to repaint set to 0)."""
        image = image_to_tensor(self.image)
        if self.pixel_mask is None:
            return [image]
        return [image, image * (self.pixel_mask < 0.5)]

    def take_moments(self, moments: Sequence[torch.Tensor]) -> None:
        """Sample the init image's posterior (a tiny VAE's latents are taken as they are), then noise it to
        the first timestep; an inpainting model's masked image is sampled last (diffusers' generator order)."""
        init = self._latents(moments[0])
        noise = variation_noise(tuple(init.shape), self.generator, self.subseed, self.subseed_strength).to(self.device)
        if self.pixel_mask is not None:
            mask = F.interpolate(self.pixel_mask[None, None], size=init.shape[-2:], mode="nearest")
            self.conditioning = torch.cat([mask, self._latents(moments[1])], dim=1)
        if self.edit is not None:
            self.init_latents, self.noise = init, noise
            if self.fill == LATENT_NOISE:
                init = init * (1 - self.edit) + noise * self.edit
            elif self.fill == LATENT_NOTHING:
                init = init * (1 - self.edit)
        self.latents = self._noised(init, noise, 0)
        self.phase = Phase.DENOISE

    def _latents(self, moments: torch.Tensor) -> torch.Tensor:
        """Scaled latents [1, C, h, w] from an encoder output: the posterior sampled with this job's generator."""
        latents = moments.unsqueeze(0).float()
        if self.posterior:
            latents = DiagonalGaussianDistribution(latents).sample(self.generator)
        return (latents - self.shift_factor) * self.scaling_factor

    def _noised(self, init: torch.Tensor, noise: torch.Tensor, at: int) -> torch.Tensor:
        """`init` noised to this job's step `at`, as the sampler's `add_noise`."""
        if self.traj is not None:
            return add_noise([self.traj], init, noise, [at])
        return self.scheduler.add_noise(init, noise, self.timesteps[at : at + 1])

    # --- DENOISE ---
    @property
    def rows(self) -> int:
        return 2 if self.cfg else 1

    @property
    def embeddings(self) -> Conditioning:
        """This job's conditioning at its next step (text embeddings; for SDXL also pooled and sizes), one
        per UNet row (unconditional first)."""
        cond = self.cond.at(self.index)
        if not self.cfg:
            return cond
        uncond = self.uncond.at(self.index)
        return {name: torch.cat([uncond[name], value]) for name, value in cond.items()}

    def unet_input(self) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """This job's UNet rows with its own scheduler: (sample, timestep, conditioning); the sample holds the
        latents only (the executor adds an inpainting model's extra channels)."""
        t = self.timesteps[self.index]
        latents = torch.cat([self.latents] * self.rows)
        sample = self.scheduler.scale_model_input(latents, t)
        timestep = torch.full((self.rows,), float(t), dtype=torch.float32, device=self.device)
        return sample, timestep, self.embeddings

    def take_noise_pred(self, noise_pred: torch.Tensor) -> None:
        """Advance this job's own scheduler one step with its rows of the UNet output."""
        noise_pred = noise_pred.float()
        if self.cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance * (cond - uncond)
        t = self.timesteps[self.index]
        self.advanced(self.scheduler.step(noise_pred, t, self.latents, **self.step_kwargs, return_dict=False)[0])

    def advanced(self, latents: torch.Tensor) -> None:
        """Take the latents after this job's next step (from its scheduler or the batched step)."""
        self.latents = latents
        self.index += 1
        if self.keep_unmasked:
            self._keep_unmasked()
        if self.index == len(self.timesteps):
            self.phase = Phase.DECODE

    def _keep_unmasked(self) -> None:
        """Outside the latent mask, put back the init latents noised to the next step (none after the last)."""
        keep = self.init_latents
        if self.index < len(self.timesteps):
            keep = self._noised(keep, self.noise, self.index)
        self.latents = keep * (1 - self.edit) + self.latents * self.edit

    # --- DECODE ---
    def decoder_input(self) -> torch.Tensor:
        return (self.latents[0] / self.scaling_factor) + self.shift_factor

    def take_image(self, image: torch.Tensor) -> None:
        self.result = tensor_to_image(image, self.rounding)
        self.latents = None
        self.phase = Phase.DONE
