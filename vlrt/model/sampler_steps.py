"""Sampler steps for many img2img jobs at once: one tensor update advances every row of a UNet round.

diffusers' schedulers step one sample at a time, with the step index, the schedule and (for
multistep solvers) the history inside the scheduler object, so a round of B jobs costs B Python
calls of a dozen small tensor ops each. Here the schedules are still diffusers' own (`set_timesteps`
runs once per sampler, scheduler config and step count, through `make_scheduler`, and its
`timesteps`, `sigmas`, `alphas_cumprod` are read back), but each step's scalars are tabulated per
schedule position, gathered per row into a [B] tensor and broadcast over [B, 1, 1, 1], so one call
of a few tensor ops advances every row, each at its own position of its own schedule. The update
repeats diffusers' arithmetic operation for operation, so trajectories equal diffusers' (bit for bit
in float32 on the CPU, tests/test_sampler_steps.py).

Batched rules exist for Euler, Euler a, DPM++ 2M, DPM++ 2M SDE (and their Karras forms), DDIM and
LCM. `plan` returns None for other samplers and for configs these rules do not cover
(thresholding, learned variance, flow sigmas, Euler a predicting samples): the caller then keeps a
per-job diffusers scheduler.

The API (a trajectory is one job's schedule and sampler state; rows of a batch are trajectories):

- `plan(sampler_name, scheduler_config, steps, strength, device) -> Trajectory | None`: the img2img
  schedule of diffusers' `StableDiffusionImg2ImgPipeline` (`t_start = n - min(int(n * strength), n)`,
  the scheduler's begin index there). `Trajectory.timesteps` (float32, the steps this job runs, as
  the UNet sees them), `.index` (steps taken), `.done`, `.timestep` (the next one, a float).
- `add_noise(trajs, init, noise, at=None)`: `init` noised to each row's step `at[b]` (default 0, the
  img2img start; after k steps, `at=[k]` is what inpainting puts back outside the mask).
- `scale_model_input(trajs, sample)`, `model_timesteps(trajs, device)`: the UNet's sample and float32 [B] timesteps.
- `needs_noise(traj)`, `draw_noise(trajs, generators, shape, device)`: whether a row's next step
  takes fresh noise (Euler a and SDE every step, LCM all but its last) and that noise, drawn from each
  job's own CPU generator exactly as diffusers' step draws it (zeros on rows that take none).
- `step(trajs, model_output, sample, noise) -> Tensor`: advances every row by one step.

A round, rows joining and leaving between rounds::

    traj = plan(sampler_name, scheduler_config, steps, strength, device)   # per job, once
    latents = add_noise(trajs, init, noise)                                # img2img start
    while rows remain:
        x = scale_model_input(trajs, latents)
        eps = cfg_mix(unet(x, model_timesteps(trajs, device), ...))       # the caller's model
        fresh = draw_noise(trajs, generators, latents.shape[1:], device)
        latents = step(trajs, eps, latents, fresh)

`step` needs all trajectories of one call to share `Trajectory.group`: the same sampler family
(DPM++ 2M with or without Karras sigmas share one) and prediction type; they may differ in step count, strength and
position. `add_noise`, `scale_model_input` and `model_timesteps` take any mix. Inputs of any float
dtype are computed in float32 and the results are float32. What goes from the host to a GPU (the
rows' scalars, noise, timesteps) is copied from pinned memory without blocking, so preparing a
round never waits for the kernels already queued.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from vlrt.model.samplers import make_scheduler

_PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class _Rule:
    """What one step computes; every trajectory of one `step` call must share it."""

    kind: str  # "euler", "dpm2m", "ddim" or "lcm"
    prediction: str  # epsilon, v_prediction or sample
    noisy: bool = False  # Euler a, DPM++ 2M SDE: fresh noise every step
    clip: float | None = None  # DDIM/LCM clip_sample_range, where clip_sample is on


@dataclass(frozen=True)
class _Schedule:
    """One (sampler, config, steps) schedule, tabulated per position as float32 values (Python floats
    hold them exactly, so a batch's rows become one [B, K] tensor with a single host-to-device copy)."""

    rule: _Rule
    timesteps: torch.Tensor  # float32, every position, as the UNet sees them
    times: tuple[float, ...]  # the same, as Python floats
    scale: tuple[float, ...]  # model input = sample / scale
    noising: tuple[tuple[float, float], ...]  # add_noise = a * sample + b * noise
    coefs: tuple[tuple[float, ...], ...]  # the step's scalars, per rule
    second: tuple[tuple[float, float] | None, ...]  # DPM++ 2M: (C, R) of a second-order step
    first_only: tuple[bool, ...]  # DPM++ 2M: a first-order step whatever the history (lower_order_final)
    draws: tuple[bool, ...]  # whether diffusers' step draws noise at this position


class Trajectory:
    """One job's img2img schedule and sampler state (for DPM++ 2M, its previous data prediction)."""

    def __init__(self, schedule: _Schedule, begin: int, device: torch.device) -> None:
        self.schedule = schedule
        self.begin = begin
        self.timesteps = _to_device(schedule.timesteps[begin:], device)
        self.index = 0
        self.previous: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        """Every step taken (true from the start when the strength leaves no step)."""
        return self.index >= len(self.timesteps)

    @property
    def position(self) -> int:
        """The position in the full schedule: the scheduler's `step_index`."""
        return self.begin + self.index

    @property
    def group(self) -> _Rule:
        """Trajectories with equal groups may share one `step` call."""
        return self.schedule.rule

    @property
    def timestep(self) -> float:
        """The timestep the UNet sees for the next step."""
        return self.schedule.times[self.position]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory without blocking: a plain copy would
    make the host wait for every kernel already queued, stalling the next round's preparation."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _floats(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(t.float().tolist())


def _rows(*columns: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    return tuple(zip(*(_floats(c) for c in columns)))


def _rule(scheduler: SchedulerMixin) -> _Rule | None:
    """The batched rule for a configured diffusers scheduler, or None where there is none."""
    config = scheduler.config
    prediction = "sample" if config.prediction_type == "original_sample" else config.prediction_type
    if prediction not in _PREDICTIONS or getattr(config, "thresholding", False):
        return None
    if isinstance(scheduler, EulerAncestralDiscreteScheduler):
        return None if prediction == "sample" else _Rule("euler", prediction, noisy=True)
    if isinstance(scheduler, EulerDiscreteScheduler):
        return _Rule("euler", prediction)
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        plain = (
            config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
            and config.solver_order == 2
            and config.solver_type in ("midpoint", "heun")
            and config.variance_type not in ("learned", "learned_range")
            and not config.use_flow_sigmas
        )
        return _Rule("dpm2m", prediction, noisy=config.algorithm_type == "sde-dpmsolver++") if plain else None
    if isinstance(scheduler, (DDIMScheduler, LCMScheduler)):
        clip = float(config.clip_sample_range) if config.clip_sample else None
        return _Rule("ddim" if isinstance(scheduler, DDIMScheduler) else "lcm", prediction, clip=clip)
    return None


def _euler(s: SchedulerMixin, rule: _Rule) -> dict[str, Any]:
    sigma, sigma_next = s.sigmas[:-1], s.sigmas[1:]
    if rule.noisy:
        up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        dt = (sigma_next**2 - up**2) ** 0.5 - sigma
    else:  # no churn: sigma_hat is sigma
        up = torch.zeros_like(sigma)
        dt = sigma_next - sigma
    n = len(sigma)
    return dict(
        scale=_floats((sigma**2 + 1) ** 0.5),
        noising=_rows(torch.ones_like(sigma), sigma),
        coefs=_rows(sigma, dt, up, -sigma / (sigma**2 + 1) ** 0.5, sigma**2 + 1),
        draws=(rule.noisy,) * n,
    )


def _dpm2m(s: DPMSolverMultistepScheduler, rule: _Rule) -> dict[str, Any]:
    """x = A * sample + B * D0 + C * D1 (+ N * noise for SDE), D1 = R * (m0 - m1); where diffusers
    subtracts a term, B or C holds its negative (a - b * x and a + (-b) * x round alike)."""
    alpha = 1 / ((s.sigmas**2 + 1) ** 0.5)
    sig = s.sigmas * alpha
    lam = torch.log(alpha) - torch.log(sig)
    n = len(s.timesteps)
    h = lam[1:] - lam[:-1]
    r = 1.0 / ((lam[1:-1] - lam[:-2]) / h[1:])
    heun = s.config.solver_type == "heun"
    if rule.noisy:
        a = sig[1:] / sig[:-1] * torch.exp(-h)
        b = alpha[1:] * (1 - torch.exp(-2.0 * h))
        c = alpha[2:] * ((1.0 - torch.exp(-2.0 * h[1:])) / (-2.0 * h[1:]) + 1.0) if heun else 0.5 * b[1:]
        noise = sig[1:] * torch.sqrt(1.0 - torch.exp(-2 * h))
    else:
        a = sig[1:] / sig[:-1]
        b = alpha[1:] * (torch.exp(-h) - 1.0)
        c = alpha[2:] * ((torch.exp(-h[1:]) - 1.0) / h[1:] + 1.0) if heun else -(0.5 * b[1:])
        b = -b
        noise = torch.zeros_like(a)
    final = s.config.euler_at_final or (s.config.lower_order_final and n < 15) or s.config.final_sigmas_type == "zero"
    return dict(
        scale=(1.0,) * n,
        noising=_rows(alpha[:-1], sig[:-1]),
        coefs=_rows(alpha[:-1], sig[:-1], a, b, noise),
        second=(None, *_rows(c, r)),
        first_only=tuple(final and i == n - 1 for i in range(n)),
        draws=(rule.noisy,) * n,
    )


def _alphas(s: DDIMScheduler | LCMScheduler, t: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at timesteps t, final_alpha_cumprod where t < 0."""
    return torch.where(t >= 0, s.alphas_cumprod[t.clamp(min=0)], s.final_alpha_cumprod)


def _ddim(s: DDIMScheduler, rule: _Rule) -> dict[str, Any]:
    t = s.timesteps
    a = s.alphas_cumprod[t]
    a_prev = _alphas(s, t - s.config.num_train_timesteps // s.num_inference_steps)
    n = len(t)
    # eta 0, as the img2img pipeline steps it: std_dev_t is 0 and the direction is (1 - a_prev) ** 0.5.
    return dict(
        scale=(1.0,) * n,
        noising=_rows(a**0.5, (1 - a) ** 0.5),
        coefs=_rows(a**0.5, (1 - a) ** 0.5, a_prev**0.5, (1 - a_prev) ** 0.5),
        draws=(False,) * n,
    )


def _lcm(s: LCMScheduler, rule: _Rule) -> dict[str, Any]:
    t = s.timesteps
    n = len(t)
    a = s.alphas_cumprod[t]
    a_prev = _alphas(s, torch.cat([t[1:], t[-1:]]))
    last = torch.arange(n) == n - 1  # the last step returns the denoised sample, no noise
    scaled = t.float() * s.config.timestep_scaling
    sigma_data = 0.5
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return dict(
        scale=(1.0,) * n,
        noising=_rows(a**0.5, (1 - a) ** 0.5),
        coefs=_rows(a.sqrt(), (1 - a).sqrt(), c_skip, c_out, torch.where(last, 1.0, a_prev.sqrt()),
                    torch.where(last, 0.0, (1 - a_prev).sqrt())),
        draws=tuple(not x for x in last.tolist()),
    )


_TABLES = {"euler": _euler, "dpm2m": _dpm2m, "ddim": _ddim, "lcm": _lcm}


@lru_cache(maxsize=64)
def _schedule(sampler_name: str, config_json: str, steps: int) -> _Schedule | None:
    scheduler = make_scheduler(sampler_name, json.loads(config_json), steps)
    rule = _rule(scheduler)
    if rule is None:
        return None
    tables = _TABLES[rule.kind](scheduler, rule)
    n = len(scheduler.timesteps)
    timesteps = scheduler.timesteps.to(torch.float32).cpu()
    return _Schedule(
        rule=rule,
        timesteps=timesteps,
        times=_floats(timesteps),
        scale=tables["scale"],
        noising=tables["noising"],
        coefs=tables["coefs"],
        second=tables.get("second", (None,) * n),
        first_only=tables.get("first_only", (False,) * n),
        draws=tables["draws"],
    )


def plan(sampler_name: str, scheduler_config: dict[str, Any], steps: int, strength: float,
         device: torch.device) -> Trajectory | None:
    """One job's img2img trajectory, started as diffusers' `StableDiffusionImg2ImgPipeline` starts it:
    `int(steps * strength)` steps from the end of diffusers' own schedule. None when the sampler (or
    its config) has no batched rule: the caller then steps a per-job diffusers scheduler. A strength
    too low for the step count gives a trajectory that is already done."""
    schedule = _schedule(sampler_name, json.dumps(dict(scheduler_config), sort_keys=True), steps)
    if schedule is None:
        return None
    n = len(schedule.timesteps)
    return Trajectory(schedule, n - min(int(n * strength), n), torch.device(device))


def needs_noise(traj: Trajectory) -> bool:
    """Whether this trajectory's next step takes fresh noise (Euler a and SDE every step, LCM all but its last)."""
    return traj.schedule.draws[traj.position]


def draw_noise(trajs: list[Trajectory], generators: list[torch.Generator], shape: tuple[int, ...],
               device: torch.device) -> torch.Tensor | None:
    """The fresh noise of one `step` call: row b drawn from generators[b] (a CPU generator) exactly as
    diffusers' step draws it (float32 on the CPU; a leading batch dimension of 1 draws the same values),
    zeros for rows that take none; None when no row takes any."""
    wanted = [needs_noise(t) for t in trajs]
    if not any(wanted):
        return None
    rows = [torch.randn(shape, generator=g, dtype=torch.float32) if w else torch.zeros(shape) for w, g in zip(wanted, generators)]
    return _to_device(torch.stack(rows), torch.device(device))


def _column(rows: list[tuple[float, ...]], like: torch.Tensor) -> list[torch.Tensor]:
    """Per-row scalars as [B, 1, …] float32 tensors on `like`'s device, one column per scalar."""
    table = _to_device(torch.tensor(rows, dtype=torch.float32), like.device)
    shape = (len(rows),) + (1,) * (like.dim() - 1)
    return [c.reshape(shape) for c in table.unbind(1)]


def model_timesteps(trajs: list[Trajectory], device: torch.device) -> torch.Tensor:
    """Each row's timestep for the UNet, float32 [B]."""
    return _to_device(torch.tensor([t.timestep for t in trajs], dtype=torch.float32), torch.device(device))


def add_noise(trajs: list[Trajectory], init: torch.Tensor, noise: torch.Tensor, at: list[int] | None = None) -> torch.Tensor:
    """`init` noised to each trajectory's step `at[b]` (default its first), as the scheduler's
    `add_noise` does there (also what inpainting puts back outside the mask after a step)."""
    at = at or [0] * len(trajs)
    a, b = _column([t.schedule.noising[t.begin + i] for t, i in zip(trajs, at)], init)
    return a * init.float() + b * noise.float()


def scale_model_input(trajs: list[Trajectory], sample: torch.Tensor) -> torch.Tensor:
    """The UNet input of each row at its trajectory's next step, as the scheduler's `scale_model_input`."""
    (scale,) = _column([(t.schedule.scale[t.position],) for t in trajs], sample)
    return sample.float() / scale


def _x0(rule: _Rule, out: torch.Tensor, sample: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """The data prediction from the model output, with alpha = sa and sigma = sb at this step."""
    if rule.prediction == "epsilon":
        return (sample - sb * out) / sa
    if rule.prediction == "v_prediction":
        return sa * sample - sb * out
    return out


def _clip(rule: _Rule, x0: torch.Tensor) -> torch.Tensor:
    return x0 if rule.clip is None else x0.clamp(-rule.clip, rule.clip)


def _step_euler(
    rule: _Rule, coefs: list[torch.Tensor], out: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    sigma, dt, up, v_out, v_skip = coefs
    if rule.prediction == "epsilon":
        x0 = sample - sigma * out
    elif rule.prediction == "v_prediction":
        x0 = out * v_out + sample / v_skip
    else:
        x0 = out
    prev = sample + (sample - x0) / sigma * dt
    return prev + noise * up if rule.noisy else prev


def _step_ddim(
    rule: _Rule, coefs: list[torch.Tensor], out: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    sa, sb, sa_prev, direction = coefs
    x0 = _x0(rule, out, sample, sa, sb)
    if rule.prediction == "epsilon":
        eps = out
    elif rule.prediction == "v_prediction":
        eps = sa * out + sb * sample
    else:
        eps = (sample - sa * x0) / sb
    return sa_prev * _clip(rule, x0) + direction * eps


def _step_lcm(
    rule: _Rule, coefs: list[torch.Tensor], out: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    sa, sb, c_skip, c_out, sa_prev, sb_prev = coefs
    denoised = c_out * _clip(rule, _x0(rule, out, sample, sa, sb)) + c_skip * sample
    return sa_prev * denoised if noise is None else sa_prev * denoised + sb_prev * noise


def _step_dpm2m(trajs: list[Trajectory], out: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """DPM-Solver++(2M) and its SDE form: first order on a trajectory's first step and where
    lower_order_final asks, second order from the previous data prediction elsewhere (its term is
    zeroed on first-order rows)."""
    rule = trajs[0].schedule.rule
    second = [t.index > 0 and not t.schedule.first_only[t.position] for t in trajs]
    rows = [t.schedule.coefs[t.position] + (t.schedule.second[t.position] if s else (0.0, 0.0)) for t, s in zip(trajs, second)]
    alpha_s, sigma_s, a, b, n, c, r = _column(rows, sample)
    m0 = _x0(rule, out, sample, alpha_s, sigma_s)
    m1 = torch.stack([t.previous if s else m0[i] for i, (t, s) in enumerate(zip(trajs, second))])
    prev = a * sample + b * m0 + c * (r * (m0 - m1))
    for t, row in zip(trajs, m0):
        t.previous = row
    return prev + n * noise if rule.noisy else prev


_STEPS = {"euler": _step_euler, "ddim": _step_ddim, "lcm": _step_lcm}


def step(trajs: list[Trajectory], model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Advance every trajectory one step: row b of `model_output` (the guided prediction) and `sample`
    belong to trajs[b]; `noise` row b is the fresh noise trajs[b] needs (see `draw_noise`), None when
    none needs any. Returns the float32 samples after the step, as the schedulers' `step` would."""
    rule = trajs[0].group
    if any(t.group != rule for t in trajs):
        raise ValueError("step: every trajectory of one call must share its group (Trajectory.group); group rows by it")
    if any(t.done for t in trajs):
        raise ValueError("step: a trajectory has no step left")
    if noise is None and any(needs_noise(t) for t in trajs):
        raise ValueError("step: these trajectories need fresh noise (draw_noise) and none was given")
    out, sample = model_output.float(), sample.float()
    noise = None if noise is None else noise.float()
    if rule.kind == "dpm2m":
        prev = _step_dpm2m(trajs, out, sample, noise)
    else:
        coefs = _column([t.schedule.coefs[t.position] for t in trajs], sample)
        prev = _STEPS[rule.kind](rule, coefs, out, sample, noise)
    for t in trajs:
        t.index += 1
        if t.done:
            t.previous = None
    return prev
