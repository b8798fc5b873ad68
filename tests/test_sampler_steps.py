"""Batched sampler steps against diffusers' own schedulers stepped one job at a time.

Every job runs img2img as diffusers' `StableDiffusionImg2ImgPipeline` runs it (start `int(steps *
strength)` steps from the end, `set_begin_index`, `add_noise` at the first timestep, then
`scale_model_input`, the model and `step` with the job's generator); the batched side runs the same
jobs in shared rounds, joining at different rounds, through `vlrt.model.sampler_steps`.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from vlrt.demo.train import SCHEDULER_CONFIG
from vlrt.errors import VlrtError
from vlrt.model import sampler_steps as ss
from vlrt.model.samplers import make_scheduler

SHAPE = (4, 8, 8)
# (steps, strength, seed, round it joins): different lengths, starts and positions in one batch; the
# 6 × 0.3 job has one step (first and last at once), the 6 × 0.1 job none.
JOBS = [(6, 0.3, 11, 0), (8, 0.5, 12, 0), (20, 1.0, 13, 1), (8, 0.75, 14, 3), (20, 0.5, 15, 2), (6, 0.1, 16, 0)]
BATCHED = ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DDIM", "LCM"]

_W = torch.randn((SHAPE[0], SHAPE[0]), generator=torch.Generator().manual_seed(0)) * 0.3
_BIAS = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet: a fixed channel mix plus a timestep-dependent bias, row by row."""
    phase = torch.sin(t.float() / 150.0).reshape(-1, 1, 1, 1)
    return torch.einsum("oc,bchw->bohw", _W, sample) + phase * _BIAS


def _start(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + b)
    return torch.randn((1, *SHAPE), generator=g), torch.randn((1, *SHAPE), generator=g)


def diffusers_job(name: str, config: dict, steps: int, strength: float, seed: int, init, noise) -> dict:
    """One job through a diffusers scheduler, as the img2img pipeline drives it."""
    scheduler = make_scheduler(name, config, steps)
    n = len(scheduler.timesteps)
    t_start = n - min(int(n * strength), n)
    timesteps = scheduler.timesteps[t_start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}
    latents = scheduler.add_noise(init, noise, timesteps[:1]) if len(timesteps) else init
    record = {"start": latents, "inputs": [], "timesteps": [], "latents": []}
    for t in timesteps:
        x = scheduler.scale_model_input(latents, t)
        record["inputs"].append(x)
        record["timesteps"].append(float(t))
        latents = scheduler.step(model(x, t[None]), t, latents, **kwargs, return_dict=False)[0]
        record["latents"].append(latents)
    return record


def batched_jobs(names: list[str], config: dict) -> list[dict]:
    """The same jobs (job b with sampler names[b]), every round's active rows advanced by one batched
    call of each function."""
    trajs = [ss.plan(name, config, steps, strength, torch.device("cpu")) for name, (steps, strength, _, _) in zip(names, JOBS)]
    generators = [torch.Generator().manual_seed(seed) for _, _, seed, _ in JOBS]
    records = [{"inputs": [], "timesteps": [], "latents": []} for _ in JOBS]
    latents: dict[int, torch.Tensor] = {}
    for round_ in range(40):
        joining = [b for b, job in enumerate(JOBS) if job[3] == round_ and not trajs[b].done]
        if joining:
            init, noise = zip(*(_start(b) for b in joining))
            started = ss.add_noise([trajs[b] for b in joining], torch.cat(init), torch.cat(noise))
            for b, row in zip(joining, started):
                latents[b] = row[None]
                records[b]["start"] = latents[b]
        active = [b for b in sorted(latents) if not trajs[b].done]
        if not active:
            continue
        rows = [trajs[b] for b in active]
        sample = torch.cat([latents[b] for b in active])
        x = ss.scale_model_input(rows, sample)
        t = ss.model_timesteps(rows, torch.device("cpu"))
        fresh = ss.draw_noise(rows, [generators[b] for b in active], SHAPE, torch.device("cpu"))
        stepped = ss.step(rows, model(x, t), sample, fresh)
        for i, b in enumerate(active):
            records[b]["inputs"].append(x[i : i + 1])
            records[b]["timesteps"].append(float(t[i]))
            latents[b] = stepped[i : i + 1]
            records[b]["latents"].append(latents[b])
    assert all(traj.done for traj in trajs)
    return records


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((float((x - y).abs().max()) for x, y in zip(a, b)), default=0.0)


def _compare(batched: list[dict], names: list[str], config: dict) -> None:
    for b, (steps, strength, seed, _) in enumerate(JOBS):
        ref = diffusers_job(names[b], config, steps, strength, seed, *_start(b))
        got = batched[b]
        assert len(got["latents"]) == len(ref["latents"]) == min(int(steps * strength), steps)
        if not ref["latents"]:
            continue
        assert got["timesteps"] == ref["timesteps"]
        assert _max_diff([got["start"]], [ref["start"]]) <= 1e-5
        assert _max_diff(got["inputs"], ref["inputs"]) <= 1e-5
        assert _max_diff(got["latents"], ref["latents"]) <= 1e-5, f"job {b}"


PREDICTIONS = ("epsilon", "v_prediction", "sample")  # Euler a has no "sample" rule in diffusers
VARIANTS = [(name, p, {}) for name in BATCHED for p in PREDICTIONS if (name, p) != ("Euler a", "sample")] + [
    ("DPM++ 2M", "epsilon", {"solver_type": "heun"}),
    ("DPM++ 2M SDE", "v_prediction", {"solver_type": "heun"}),
    ("DPM++ 2M Karras", "epsilon", {"final_sigmas_type": "sigma_min"}),
    ("DPM++ 2M", "epsilon", {"euler_at_final": True, "lower_order_final": False}),
    ("DDIM", "epsilon", {"clip_sample": True, "clip_sample_range": 0.5}),
    ("LCM", "v_prediction", {"clip_sample": True}),
]


@pytest.mark.parametrize("name, prediction, extra", VARIANTS)
def test_batched_trajectories_equal_diffusers(name: str, prediction: str, extra: dict):
    config = {**SCHEDULER_CONFIG, "prediction_type": prediction, **extra}
    _compare(batched_jobs([name] * len(JOBS), config), [name] * len(JOBS), config)


@pytest.mark.parametrize("family", [("DPM++ 2M", "DPM++ 2M Karras"), ("DPM++ 2M SDE", "DPM++ 2M SDE Karras")])
def test_karras_and_plain_sigmas_share_a_step(family: tuple[str, str]):
    names = [family[b % 2] for b in range(len(JOBS))]
    trajs = [ss.plan(name, SCHEDULER_CONFIG, 8, 0.5, torch.device("cpu")) for name in family]
    assert trajs[0].group == trajs[1].group
    _compare(batched_jobs(names, SCHEDULER_CONFIG), names, SCHEDULER_CONFIG)


def test_add_noise_and_scale_model_input_mix_samplers_and_positions():
    """One call over rows of every batched sampler, each after its own number of steps: the init latents
    noised there as the scheduler's `add_noise` does (inpainting's kept latents), the UNet input as
    its `scale_model_input`, and the timestep."""
    config = {**SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
    steps, strength = 8, 0.75
    trajs, at, noised, before, scaled, times = [], [], [], [], [], []
    for b, name in enumerate(BATCHED):
        taken = b % 4
        init, noise = _start(b)
        scheduler = make_scheduler(name, config, steps)
        t_start = steps - int(steps * strength)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        latents, timesteps = init, scheduler.timesteps[t_start:]
        for t in timesteps[:taken]:
            x = scheduler.scale_model_input(latents, t)
            gen = torch.Generator().manual_seed(b)
            latents = scheduler.step(model(x, t[None]), t, latents, generator=gen, return_dict=False)[0]
        noised.append(scheduler.add_noise(init, noise, timesteps[taken : taken + 1]))
        before.append(latents)
        scaled.append(scheduler.scale_model_input(latents, timesteps[taken]))
        times.append(float(timesteps[taken]))
        trajs.append(ss.plan(name, config, steps, strength, torch.device("cpu")))
        trajs[-1].index = taken
        at.append(taken)
    init, noise = (torch.cat(parts) for parts in zip(*(_start(b) for b in range(len(BATCHED)))))
    assert _max_diff([ss.add_noise(trajs, init, noise, at)], [torch.cat(noised)]) <= 1e-5
    assert _max_diff([ss.scale_model_input(trajs, torch.cat(before))], [torch.cat(scaled)]) <= 1e-5
    assert ss.model_timesteps(trajs, torch.device("cpu")).tolist() == times


def test_trajectory_follows_the_img2img_schedule():
    """timesteps and needs_noise read from diffusers' own scheduler and the pipeline's t_start rule."""
    traj = ss.plan("LCM", SCHEDULER_CONFIG, 8, 0.5, torch.device("cpu"))
    scheduler = make_scheduler("LCM", SCHEDULER_CONFIG, 8)
    assert torch.equal(traj.timesteps, scheduler.timesteps[4:].float())
    flags = []
    while not traj.done:
        flags.append(ss.needs_noise(traj))
        traj.index += 1
    assert flags == [True, True, True, False]  # LCM adds no noise after its last step
    assert ss.needs_noise(ss.plan("Euler a", SCHEDULER_CONFIG, 8, 0.5, torch.device("cpu")))
    assert not ss.needs_noise(ss.plan("DPM++ 2M", SCHEDULER_CONFIG, 8, 0.5, torch.device("cpu")))
    assert ss.plan("Euler", SCHEDULER_CONFIG, 6, 0.1, torch.device("cpu")).done


@pytest.mark.parametrize("name, extra", [
    ("Heun", {}), ("PLMS", {}), ("UniPC", {}),
    ("DPM++ 2M", {"thresholding": True}), ("DDIM", {"thresholding": True}), ("Euler a", {"prediction_type": "sample"}),
])
def test_no_batched_rule_gives_none(name: str, extra: dict):
    assert ss.plan(name, {**SCHEDULER_CONFIG, **extra}, 8, 0.5, torch.device("cpu")) is None


def test_unknown_sampler_is_a_user_error():
    with pytest.raises(VlrtError, match="unknown sampler_name 'Euler b'"):
        ss.plan("Euler b", SCHEDULER_CONFIG, 8, 0.5, torch.device("cpu"))


def test_step_refuses_mixed_rules_and_missing_noise():
    euler = ss.plan("Euler", SCHEDULER_CONFIG, 8, 0.5, torch.device("cpu"))
    ddim = ss.plan("DDIM", SCHEDULER_CONFIG, 8, 0.5, torch.device("cpu"))
    sample = torch.zeros((2, *SHAPE))
    with pytest.raises(ValueError, match="share its group"):
        ss.step([euler, ddim], sample, sample, None)
    ancestral = ss.plan("Euler a", SCHEDULER_CONFIG, 8, 0.5, torch.device("cpu"))
    with pytest.raises(ValueError, match="need fresh noise"):
        ss.step([ancestral], sample[:1], sample[:1], None)
    assert euler.index == ddim.index == ancestral.index == 0


def test_bench_runs_both_ways_to_the_same_latents():
    """`vlrt bench samplers` on a tiny batch: both ways end at the same latents for every sampler."""
    from vlrt.tools.bench import BATCHED_SAMPLERS, bench_sampler_steps

    results = bench_sampler_steps(batch=3, shape=SHAPE, steps=4, repeats=1)
    assert set(results) == set(BATCHED_SAMPLERS) == set(BATCHED)
    assert all(r["max_diff"] <= 1e-5 and r["per job"] > 0 and r["batched"] > 0 for r in results.values())
