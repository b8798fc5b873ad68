"""Samplers by their WebUI names, as diffusers schedulers.

Each job gets its own scheduler instance (they are stateful: step index, multistep history),
so jobs at different steps can share one UNet call.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from vlrt.errors import VlrtError

SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
    "LMS Karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DDIM": (DDIMScheduler, {}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "LCM": (LCMScheduler, {}),
}


# Samplers that evaluate the UNet twice a step: the WebUI's prompt schedules count those evaluations,
# over twice the steps (its "second_order" samplers; Heun is vlrt's one).
SECOND_ORDER = frozenset({"Heun"})


def prompt_steps(name: str, steps: int) -> int:
    """The length of a prompt schedule's timeline (`prompt_schedule`) for `steps` steps of sampler `name`."""
    return steps * 2 if name in SECOND_ORDER else steps
# The WebUI's schedule types as scheduler config changes. SGM Uniform spaces the timesteps evenly from
# the last training timestep down ("trailing" in diffusers' terms), which few-step models (SD-Turbo,
# SDXL-Turbo/Lightning, Hyper-SD) were distilled for; "leading" would skip their first, noisiest step.
SCHEDULE_CONFIG: dict[str, dict[str, Any]] = {"Automatic": {}, "SGM Uniform": {"timestep_spacing": "trailing"}}


def schedule_config(config: dict[str, Any], schedule_type: str) -> dict[str, Any]:
    """The model's scheduler config with a WebUI schedule type (`scheduler` setting) applied."""
    return {**config, **SCHEDULE_CONFIG[schedule_type]}


def check_sampler(name: str) -> None:
    """Fail early, naming the choices, for a sampler vlrt does not know."""
    if name not in SAMPLERS:
        raise VlrtError(f"unknown sampler_name {name!r}: choose one of {', '.join(map(repr, SAMPLERS))}")


@lru_cache(maxsize=64)
def _template(name: str, config_json: str, steps: int) -> SchedulerMixin:
    cls, overrides = SAMPLERS[name]
    # The model's scheduler config goes through unchanged, so keys it leaves to defaults
    # (diffusers' `_use_default_values`) take the sampler's own defaults, as in diffusers.
    scheduler = cls.from_config(json.loads(config_json), **overrides)
    scheduler.set_timesteps(steps)
    return scheduler


def make_scheduler(name: str, config: dict[str, Any], steps: int) -> SchedulerMixin:
    """A fresh scheduler for one job, with `steps` timesteps set (templates are cached per name and steps)."""
    check_sampler(name)
    return copy.deepcopy(_template(name, json.dumps(dict(config), sort_keys=True), steps))
