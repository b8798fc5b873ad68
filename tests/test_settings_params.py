"""Settings precedence and names, the per-frame parameters, the seed rule and variation noise."""

from __future__ import annotations

import pytest
import torch

from vlrt.cli import build_parser, settings_from_args
from vlrt.errors import VlrtError
from vlrt.executor.noise import slerp
from vlrt.settings.config import build_settings, dump_settings, load_config
from vlrt.settings.params import ParamResolver


def test_command_line_overrides_config_and_aliases_work(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('loop_n = 4\nsuperimpose_alpha = 0.5\nbatch_count = 3\nprompt = "cat"\n')
    args = build_parser().parse_args(["render", "in", "-o", "out", "--config", str(config), "--loop-n", "2", "--no-fix-seed"])
    s = settings_from_args(args)
    assert (s.loop_n, s.superimpose_alpha, s.n_iter, s.prompt, s.fix_seed) == (2, 0.5, 3, "cat", False)


def test_settings_file_reads_back_to_the_same_settings(tmp_path):
    s = build_settings(overrides=dict(loop_n=3, prompt="a 'quoted' \"prompt\"", temporal_superimpose_alpha_list="0.1,0.8,0.1", seed=5))
    path = tmp_path / "s.toml"
    path.write_text(dump_settings(s, {"version": "x"}))
    assert build_settings(load_config(path)) == s


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(temporal_superimpose_alpha_list="0.5,0.5"), "odd number"),
        (dict(temporal_superimpose_alpha_list="a,b,c"), "numbers"),
        (dict(loop_n="three"), "loop_n"),
        (dict(sampler_nam="Euler"), "unknown setting"),
        (dict(resize_mode=3), "resize_mode"),
        (dict(steps=0), "steps"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, words):
    with pytest.raises(VlrtError) as err:
        build_settings(overrides=overrides)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_seed_rule_is_a_pure_function_of_frame_and_loop():
    s = build_settings(overrides=dict(fix_seed=False, loop_n=3, seed=100, subseed=7, batch_size=2))
    r = ParamResolver(s, s.seed, s.subseed)
    p = r(4, 1)
    assert p.seed == 100 + (4 * 3 + 1) * 2 and p.subseed == 7 + (4 * 3 + 1) * 2
    assert p.sample_seeds() == [(p.seed, p.subseed), (p.seed + 1, p.subseed + 1)]
    seeds = {r(f, loop).seed + k for f in range(10) for loop in range(3) for k in range(2)}
    assert len(seeds) == 60  # every (frame, pass, sample) has its own seed
    fixed = build_settings(overrides=dict(fix_seed=True, seed=100, loop_n=3))
    assert {ParamResolver(fixed, 100, 0)(f, loop).seed for f in range(5) for loop in range(3)} == {100}


def test_schedules_set_values_per_frame_and_loop():
    s = build_settings(
        overrides=dict(
            loop_n=6,
            denoising_schedule="0.4 if loop_i<3 else 0.3",
            step_schedule="10 if loop_i<3 else 20",
            seed_schedule="[111,222,333][image_i//5%3]",
            temporal_superimpose_alpha_list="0.1,0.8,0.1",
            temporal_superimpose_schedule="[0.1, 0.8, 0.1] if loop_i<=3 else [0.0, 1.0, 0.0]",
            batch_count_schedule="(2, 3) if loop_i == 1 else 1",
            prompt_schedule="['1girl,smile','1girl,closed mouth'][image_i//10%2]",
        )
    )
    r = ParamResolver(s, 1, 1)
    p = r(0, 0)  # image_i=1, loop_i=1
    assert (p.denoising_strength, p.steps, p.seed, p.temporal_weights) == (0.4, 10, 111, (0.1, 0.8, 0.1))
    assert (p.n_iter, p.batch_size, p.prompt) == (2, 3, "1girl,smile")
    q = r(9, 4)  # image_i=10, loop_i=5
    assert (q.denoising_strength, q.steps, q.seed, q.temporal_weights) == (0.3, 20, 333, (0.0, 1.0, 0.0))
    assert (q.n_iter, q.batch_size, q.prompt) == (1, 1, "1girl,closed mouth")


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("step_schedule", "2.5", "whole number"),
        ("denoising_schedule", "'high'", "number"),
        ("denoising_schedule", "1.5", "from 0.0 to 1.0"),
        ("temporal_superimpose_schedule", "[1, 2]", "list of 3"),
        ("prompt_schedule", "3", "string"),
        ("batch_count_schedule", "(1, 2, 3)", "pair"),
    ],
)
def test_schedule_returning_the_wrong_type_is_named(name, text, words):
    s = build_settings(overrides={name: text, "temporal_superimpose_alpha_list": "0.2,0.6,0.2"})
    with pytest.raises(VlrtError) as err:
        ParamResolver(s, 1, 1)(0, 0)
    assert name in str(err.value) and words in str(err.value)


def test_slerp_ends_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-5) and torch.allclose(slerp(1.0, a, b), b, atol=1e-5)
    mid = slerp(0.5, a, b)
    # Unlike a straight mix, the spherical mix keeps the noise's norm (for near-orthogonal noises).
    lo, hi = sorted((float(a.norm()), float(b.norm())))
    assert 0.97 * lo <= float(mid.norm()) <= 1.03 * hi
    assert float(((a + b) / 2).norm()) < 0.8 * lo


def test_every_preset_is_valid_and_its_schedules_compile():
    from pathlib import Path

    presets = sorted((Path(__file__).parent.parent / "presets").glob("*.toml"))
    assert {p.stem for p in presets} >= {"demo", "extension", "stable", "stylised"}
    for path in presets:
        settings = build_settings(load_config(path))
        params = ParamResolver(settings, 1, 1)(0, settings.loop_n - 1)
        assert params.steps >= 1 and 0 <= params.denoising_strength <= 1


def test_a_number_from_batch_count_schedule_pairs_with_the_configured_batch_size():
    """vlrt's documented difference: after a pair (n_iter, batch_size) for an earlier frame or pass, a
    plain number is n_iter with the configured batch_size, not the last batch_size given (the
    extension's, which depends on the order frames and passes are processed)."""
    s = build_settings(overrides=dict(loop_n=2, batch_size=2, batch_count_schedule="(3, 4) if loop_i == 1 else 1"))
    r = ParamResolver(s, 1, 1)
    first, second = r(0, 0), r(0, 1)
    assert (first.n_iter, first.batch_size) == (3, 4)
    assert (second.n_iter, second.batch_size) == (1, 2)
