"""Prompt editing [from:to:when] and alternation [a|b]: the WebUI's schedules, and frames against
diffusers' img2img pipeline whose prompt embeddings the test swaps between steps by the WebUI's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_frames, reference_scheduler
from PIL import Image
from tiny_sd import load_pipeline

from vlrt.errors import VlrtError
from vlrt.model.prompt_schedule import prompt_schedule
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

# Expected schedules as the WebUI documents them: its wiki's "Features" page (prompt editing,
# alternating words), its "Seed breaking changes" page (1.6.0: numbers with a decimal point are
# fractions, others step numbers; spaces around the number) and the examples of its prompt parser.
WIKI_100 = (
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
    "[ in background:0.25] [shoddy:masterful:0.5]"
)
ALTERNATION_7 = "[cow|cow|horse|man|siberian tiger|ox|man] in a field"
SCHEDULES = [
    ("a [fantasy:cyberpunk:16] landscape", 40, [(16, "a fantasy landscape"), (40, "a cyberpunk landscape")]),
    (WIKI_100, 100, [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]),
    ("[cow|horse] in a field", 4, [(1, "cow in a field"), (2, "horse in a field"), (3, "cow in a field"), (4, "horse in a field")]),
    ("[red:green:0.25]", 20, [(5, "red"), (20, "green")]),
    ("[red:green:1.25]", 20, [(20, "red")]),  # 1.0-2.0 is the hires pass's range: the first pass stays red
    ("[red:green:5]", 20, [(5, "red"), (20, "green")]),
    ("[red:green:5.0]", 20, [(20, "red")]),  # a decimal point makes it a fraction: 5 × steps
    ("[foo : 0.5 ]", 10, [(5, ""), (10, "foo ")]),
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),  # emphasis inside keeps its brackets
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),  # nested
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[fe|]male", 4, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[fe|||]male", 5, [(1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female")]),
    ("[a|(b:1.1)]", 3, [(1, "a"), (2, "(b:1.1)"), (3, "a")]),
    (r"\[a:b:3\] \(c\)", 10, [(10, r"\[a:b:3\] \(c\)")]),  # escaped brackets are text (read by the emphasis parser)
    ("a cat | a dog", 10, [(10, "a cat | a dog")]),  # a bare | is text
]


@pytest.mark.parametrize("prompt, steps, want", SCHEDULES, ids=[s[0][:40] for s in SCHEDULES])
def test_schedules_are_the_webuis(prompt, steps, want):
    assert prompt_schedule(prompt, steps) == want


def test_alternation_loops_back_on_the_eighth_step():
    """The wiki: 'On step 8, the chain loops back from "man" to "cow."'"""
    texts = [text for _, text in prompt_schedule(ALTERNATION_7, 8)]
    assert texts[6] == "man in a field" and texts[7] == "cow in a field"


@pytest.mark.parametrize("prompt, words", [
    ("a [a:b:c:d]", "[a:b:c:d] is neither prompt editing"),
    ("[cat:dog]", "[cat:dog] is neither"),
    ("[a|b:3]", "[a|b:3] is neither"),
    ("cat | [a:b:3]", "'|' outside square brackets"),
])
def test_malformed_editing_is_one_clear_line(prompt, words):
    with pytest.raises(VlrtError, match=words.replace("[", r"\[").replace("|", r"\|")) as caught:
        prompt_schedule(prompt, 10)
    assert "\n" not in str(caught.value)


def test_and_is_refused_in_the_prompt_but_text_in_the_negative(demo_model):
    with pytest.raises(VlrtError, match="AND is the WebUI's composable diffusion"):
        demo_model.encode_pair("a cat AND a dog", "", steps=4, size=(32, 32))
    cond, uncond = demo_model.encode_pair("a cat and a dog", "ugly AND blurry", steps=4, size=(32, 32))
    assert cond.shapes == uncond.shapes


# --- frames ----------------------------------------------------------------------------------

STEPS, CFG, SEED, NEGATIVE = 8, 6.0, 77, "blurry"


def _reference(model, image: Image.Image, strength: float, texts: list[str]) -> np.ndarray:
    """diffusers' img2img pipeline with Euler, its prompt embeddings (its own encode_prompt) set before
    each step k to those of texts[k]: the callback after step k sets step k + 1's."""
    pipe = load_pipeline(model.path)
    pipe.scheduler = reference_scheduler("Euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    embeds = {}
    for text in set(texts):
        cond, uncond = pipe.encode_prompt(text, "cpu", 1, True, NEGATIVE)
        embeds[text] = torch.cat([uncond, cond])
    assert len(texts) == int(STEPS * strength)

    def swap(pipeline, i, t, kwargs):
        return {"prompt_embeds": embeds[texts[min(i + 1, len(texts) - 1)]]}

    uncond, cond = embeds[texts[0]].chunk(2)
    out = pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, image=image, strength=strength, num_inference_steps=STEPS,
        guidance_scale=CFG, generator=torch.Generator("cpu").manual_seed(SEED),
        callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images[0]
    return np.asarray(out)


def _render(model, clip_folder, out, prompt: str, strength: float, **extra) -> list[np.ndarray]:
    settings = build_settings(overrides=dict(
        model=str(model.path), backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name="Euler", steps=STEPS,
        denoising_strength=strength, cfg_scale=CFG, seed=SEED, prompt=prompt, negative_prompt=NEGATIVE, max_frames=2, **extra,
    ))
    render(settings, str(clip_folder), str(out) + "/", quiet=True, model=model)
    return read_frames(out)


# Two prompts the demo model was trained on, so that the picture follows the text.
A, B = "a striped pattern", "coloured discs"

# The WebUI's rule, written out: the timeline is the steps set (8), step k counted from the first step
# run uses the first schedule entry whose end is at least k. [A:B:0.5] ends A at int(0.5 × 8) = 4:
# A for k = 0…4. With strength 0.75 the job runs 6 steps, k = 0…5 (the fraction is of the 8 steps).
EDITING = [pytest.param(1.0, [A] * 5 + [B] * 3, marks=pytest.mark.slow), (0.75, [A] * 5 + [B])]


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    diff = np.abs(got.astype(int) - want.astype(int))
    return diff.max() <= 2 and diff.mean() < 0.05


@pytest.mark.parametrize("strength, texts", EDITING, ids=["strength 1", "strength 0.75"])
def test_prompt_editing_switches_the_embeddings_between_steps(demo_model, clip_folder, tmp_path, strength, texts):
    got = _render(demo_model, clip_folder, tmp_path / "edit", f"[{A}:{B}:0.5]", strength)
    inputs = read_frames(clip_folder)
    for f in (0, 1):
        assert _close(got[f], _reference(demo_model, Image.fromarray(inputs[f]), strength, texts))
    # the test can fail: a switch after half of the steps actually run gives another picture
    half = len(texts) // 2
    assert not _close(got[0], _reference(demo_model, Image.fromarray(inputs[0]), strength, [A] * half + [B] * (len(texts) - half)))


def test_alternation_changes_the_prompt_every_step(demo_model, clip_folder, tmp_path):
    got = _render(demo_model, clip_folder, tmp_path / "alt", f"[{A}|{B}]", 1.0)
    # entries end at steps 1…8 and alternate A, B, …; step k uses the entry ending at max(k, 1)
    texts = [A, A, B, A, B, A, B, A]
    image = Image.fromarray(read_frames(clip_folder)[1])
    assert _close(got[1], _reference(demo_model, image, 1.0, texts))
    assert not _close(got[1], _reference(demo_model, image, 1.0, [B if t == A else A for t in texts]))


def test_batched_rows_at_different_steps_and_prompts_equal_max_batch_1(demo_model, clip_folder, tmp_path):
    """Two passes with a per-frame schedule of edited prompts: rows of jobs at different steps, with
    different texts, share UNet calls, and every frame is what one row per call gives."""
    extra = dict(loop_n=2, prompt_schedule=f"['[{A}:{B}:3]', '[{A}|{B}|soft colours]'][image_i % 2]",
                 temporal_superimpose_alpha_list="0.2,0.6,0.2", superimpose_alpha=0.5)
    settings = dict(model="demo", backend="torch", sampler_name="Euler a", steps=STEPS, denoising_strength=0.75,
                    cfg_scale=CFG, seed=SEED, negative_prompt="[ugly:4]", **extra)
    batched = render(build_settings(overrides=settings), str(clip_folder), str(tmp_path / "b") + "/", quiet=True, model=demo_model)
    single = render(build_settings(overrides={**settings, "max_batch": 1}), str(clip_folder), str(tmp_path / "s") + "/",
                    quiet=True, model=demo_model)
    assert batched.engine_calls["unet"] < single.engine_calls["unet"]
    for a, b in zip(read_frames(tmp_path / "b"), read_frames(tmp_path / "s"), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
