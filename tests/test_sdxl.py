"""SDXL on a tiny random SDXL: vlrt's frames against diffusers' StableDiffusionXLImg2ImgPipeline, loopback
against the plain-loop reference, the WebUI's prompt syntax and CLIP skip on both encoders, ONNX Runtime
against torch, and bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import read_frames, reference_scheduler
from PIL import Image
from safetensors.torch import save_file
from test_checkpoints import no_network  # noqa: F401 (a fixture)
from test_lora import ALPHA, RANK, TEXT_TARGETS, UNET_TARGETS, kohya_name
from test_render_exactness import reference_loopback
from tiny_sdxl import POOLED, WIDTHS, load_sdxl_pipeline

from vlrt.cli import main
from vlrt.export.trt_build import profile_shapes
from vlrt.model.loading import load_model
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

CPU = torch.device("cpu")
PROMPT = "a watercolour fox"


def _pipeline(folder, sampler: str):
    pipe = load_sdxl_pipeline(folder)
    pipe.scheduler = reference_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl(pipe, image: Image.Image, seed: int, steps: int, strength: float, cfg: float, negative: str | None = "blurry"):
    """One diffusers SDXL img2img call; `negative=None` is diffusers' zeroed negative (force_zeros_for_empty_prompt)."""
    return pipe(
        prompt=PROMPT, negative_prompt=negative, image=image, strength=strength, num_inference_steps=steps,
        guidance_scale=cfg, generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("sampler, negative", [("Euler a", "blurry"), ("DPM++ 2M Karras", "")])
def test_single_pass_equals_diffusers_sdxl_img2img(sdxl_model, sdxl_dir, clip_folder, tmp_path, sampler, negative):
    """loop_n 1, α 1, fixed seed: each frame is StableDiffusionXLImg2ImgPipeline's on the same components. An empty
    negative prompt is zeroed as the WebUI does: diffusers' `negative_prompt=None` with force_zeros_for_empty_prompt."""
    steps, strength, cfg, seed = 8, 0.6, 6.5, 1234
    settings = build_settings(overrides=dict(
        model=str(sdxl_dir), backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name=sampler, steps=steps,
        denoising_strength=strength, cfg_scale=cfg, seed=seed, prompt=PROMPT, negative_prompt=negative, max_frames=3,
    ))
    render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=sdxl_model)
    pipe = _pipeline(sdxl_dir, sampler)
    assert pipe.config.force_zeros_for_empty_prompt and sdxl_model.is_sdxl
    inputs, outputs = read_frames(clip_folder)[:3], read_frames(tmp_path / "out")
    assert len(outputs) == 3
    for frame_in, frame_out in zip(inputs, outputs):
        expected = np.asarray(_sdxl(pipe, Image.fromarray(frame_in), seed, steps, strength, cfg, negative or None))
        assert _max_diff(frame_out, expected) <= 2
    assert np.abs(outputs[0].astype(int) - inputs[0].astype(int)).mean() > 2
    if not negative:  # the zeroing matters: the encoded empty prompt would give another frame
        encoded = np.asarray(_sdxl(pipe, Image.fromarray(inputs[0]), seed, steps, strength, cfg, ""))
        assert _max_diff(outputs[0], encoded) > 2


def test_sdxl_loopback_equals_plain_reference(sdxl_model, sdxl_dir, clip_folder, tmp_path):
    """3 passes, α < 1, a 3-tap temporal list and batch 2, streamed and batched, equal the plain loops over diffusers' SDXL."""
    params = dict(loop_n=3, alpha=0.4, weights=[0.25, 0.5, 0.25], batch=2, seed=77, steps=4, strength=0.5, cfg=5.0)
    settings = build_settings(overrides=dict(
        model=str(sdxl_dir), backend="torch", loop_n=params["loop_n"], superimpose_alpha=params["alpha"],
        temporal_superimpose_alpha_list="0.25,0.5,0.25", batch_size=params["batch"], fix_seed=False,
        seed=params["seed"], steps=params["steps"], denoising_strength=params["strength"], cfg_scale=params["cfg"],
        prompt=PROMPT, negative_prompt="blurry", sampler_name="Euler a", blend_rounding="floor", max_batch=16, max_frames=4,
    ))
    result = render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=sdxl_model)
    got = read_frames(tmp_path / "out")
    expected = reference_loopback(
        read_frames(clip_folder)[:4], _pipeline(sdxl_dir, "Euler a"), **params,
        sd=lambda pipe, image, seed, steps, strength, cfg, f: _sdxl(pipe, image, seed, steps, strength, cfg),
    )
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        assert _max_diff(g, e) <= 3
    rows = 4 * params["loop_n"] * params["batch"] * 2 * int(params["steps"] * params["strength"])
    assert result.engine_calls["unet"] < rows / 4  # rows of many jobs, each with its own conditioning, share calls


def _reference_embeddings(pipe, text_ids: list[list[int]], weights: list[list[float]], layers: tuple[int, int]) -> torch.Tensor:
    """Per chunk and encoder: hidden_states[layer] of [bos, tokens, eos, pad…], weighted, mean restored; chunks joined."""
    chunks = []
    for tokens, w in zip(text_ids, weights):
        per_encoder = []
        for tokenizer, encoder, layer in ((pipe.tokenizer, pipe.text_encoder, layers[0]), (pipe.tokenizer_2, pipe.text_encoder_2, layers[1])):
            ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
            ids += [tokenizer.pad_token_id] * (77 - len(ids))
            with torch.no_grad():
                z = encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
            scale = torch.tensor([1.0, *w] + [1.0] * (76 - len(w)))
            weighted = z * scale[:, None]
            per_encoder.append(weighted * (z.mean() / weighted.mean()))
        chunks.append(torch.cat(per_encoder, dim=-1))
    return torch.cat(chunks)[None]


def test_prompt_syntax_and_clip_skip_on_both_encoders(sdxl_model, sdxl_dir):
    """Emphasis and BREAK act on each encoder on its own (penultimate layers, no final norm); CLIP skip 1 and 2
    are SDXL's default; CLIP skip 3 moves CLIP-L only (the WebUI's "Clip skip SDXL"), diffusers' clip_skip=1 both."""
    pipe = load_sdxl_pipeline(sdxl_dir)
    tok = pipe.tokenizer
    cat, fox = tok("cat", add_special_tokens=False).input_ids, tok("a fox", add_special_tokens=False).input_ids
    got = sdxl_model.encode_prompt("(cat:1.5) BREAK a fox")
    want = _reference_embeddings(pipe, [cat, fox], [[1.5] * len(cat), [1.0] * len(fox)], (-2, -2))
    assert got.shape == (1, 154, sum(WIDTHS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    cond = sdxl_model.encode_pair(PROMPT, "", 20, (48, 64))[0].at(0)
    torch.testing.assert_close(cond["encoder_hidden_states"], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=1e-5, atol=1e-5)
    assert cond["time_ids"].tolist() == [[48, 64, 0, 0, 48, 64]]
    skip2 = load_model(str(sdxl_dir), CPU, options=_options(clip_skip=2))
    skip3 = load_model(str(sdxl_dir), CPU, options=_options(clip_skip=3))
    assert torch.equal(skip2.encode_prompt(PROMPT), sdxl_model.encode_prompt(PROMPT))
    deeper, _, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, clip_skip=1)  # [-3] on both
    z3 = skip3.encode_prompt(PROMPT)
    torch.testing.assert_close(z3[..., : WIDTHS[0]], deeper[..., : WIDTHS[0]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z3[..., WIDTHS[0]:], plain[..., WIDTHS[0]:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z3[..., : WIDTHS[0]], plain[..., : WIDTHS[0]])


def _options(**kwargs):
    from vlrt.model.loading import ModelOptions

    return ModelOptions(**kwargs)


OTHER = "coloured discs"


def _edited_reference(sdxl_dir, image: Image.Image, texts: list[str], steps: int, strength: float, cfg: float, seed: int):
    """diffusers' SDXL img2img with Euler, its text embeddings and pooled embedding (its own encode_prompt) set
    before each step k to those of texts[k]: the callback after step k sets step k + 1's."""
    pipe = _pipeline(sdxl_dir, "Euler")
    embeds = {}
    for text in set(texts):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(text, negative_prompt="blurry")
        embeds[text] = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
    assert len(texts) == int(steps * strength)

    def swap(pipeline, i, t, kwargs):
        hidden, pooled = embeds[texts[min(i + 1, len(texts) - 1)]]
        return {"prompt_embeds": hidden, "add_text_embeds": pooled}

    (uncond, cond), (uncond_pooled, pooled) = (e.chunk(2) for e in embeds[texts[0]])
    return np.asarray(pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=uncond_pooled, image=image, strength=strength, num_inference_steps=steps,
        guidance_scale=cfg, generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
    ).images[0])


def test_prompt_editing_on_sdxl_switches_text_and_pooled_embeddings_between_steps(sdxl_model, sdxl_dir, clip_folder, tmp_path):
    """[A:B:0.25] over 8 steps at strength 0.75: A for steps k = 0…2, then B, in both encoders' embeddings and
    the pooled one, as diffusers' SDXL img2img gives with its embeddings swapped per step."""
    steps, strength, cfg, seed = 8, 0.75, 6.0, 77
    settings = build_settings(overrides=dict(
        model=str(sdxl_dir), backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name="Euler", steps=steps,
        denoising_strength=strength, cfg_scale=cfg, seed=seed, prompt=f"[{PROMPT}:{OTHER}:0.25]",
        negative_prompt="blurry", max_frames=1,
    ))
    render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=sdxl_model)
    (got,) = read_frames(tmp_path / "out")
    image = Image.fromarray(read_frames(clip_folder)[0])
    assert _max_diff(got, _edited_reference(sdxl_dir, image, [PROMPT] * 3 + [OTHER] * 3, steps, strength, cfg, seed)) <= 2
    # the test can fail: the prompt left unedited gives another frame
    assert _max_diff(got, _edited_reference(sdxl_dir, image, [PROMPT] * 6, steps, strength, cfg, seed)) > 2


def test_sdxl_embeddings_give_clip_l_and_clip_g_vectors_as_diffusers_load_textual_inversion(sdxl_dir, tmp_path):
    """An SDXL embedding file (clip_l, clip_g): CLIP-L takes its clip_l vectors and OpenCLIP-G its clip_g ones,
    pooled embedding included, as diffusers' load_textual_inversion into each encoder; a one-encoder file is refused."""
    from vlrt.errors import VlrtError

    g = torch.Generator().manual_seed(3)
    vectors = {"clip_l": torch.randn(2, WIDTHS[0], generator=g) * 0.5, "clip_g": torch.randn(2, WIDTHS[1], generator=g) * 0.5}
    (tmp_path / "emb").mkdir()
    save_file(vectors, tmp_path / "emb" / "zebrastyle.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, WIDTHS[0])}}, tmp_path / "emb" / "oldstyle.pt")
    model = load_model(str(sdxl_dir), CPU, options=_options(embeddings_dir=str(tmp_path / "emb")))
    text = f"zebrastyle, {PROMPT}"
    cond = model.encode_pair(text, "blurry", 20, (48, 64))[0].at(0)
    pipe = load_sdxl_pipeline(sdxl_dir)
    pipe.load_textual_inversion(vectors["clip_l"], token="zebrastyle", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token="zebrastyle", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    hidden, _, pooled, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=1e-5, atol=1e-5)
    # the test can fail: the name read as text gives other embeddings
    assert not torch.allclose(cond["encoder_hidden_states"], model.encode_prompt(f"zebra style, {PROMPT}"), atol=1e-3)
    with pytest.raises(VlrtError, match="oldstyle .* is for a one-encoder model"):
        model.encode_prompt(f"oldstyle, {PROMPT}")


def test_ort_equals_torch_on_sdxl(sdxl_model, sdxl_dir, clip_folder, tmp_path):
    """The SDXL UNet's ONNX export takes text_embeds and time_ids per row; its frames equal torch's."""
    frames = {}
    for backend in ("torch", "ort"):
        settings = build_settings(overrides=dict(
            model=str(sdxl_dir), backend=backend, loop_n=2, superimpose_alpha=0.5, steps=4, denoising_strength=0.5,
            cfg_scale=6.0, seed=5, prompt=PROMPT, negative_prompt="", batch_size=2, max_frames=3,
            engines=str(tmp_path / "engines"),
        ))
        render(settings, str(clip_folder), str(tmp_path / backend) + "/", quiet=True, model=sdxl_model)
        frames[backend] = read_frames(tmp_path / backend)
    assert len(frames["ort"]) == 3
    assert max(_max_diff(a, b) for a, b in zip(frames["ort"], frames["torch"])) <= 3
    (unet,) = [p for p in (tmp_path / "engines").glob("*-unet-*") if p.is_dir() and not p.name.startswith(".")]
    inputs = {i.name for i in onnx.load(str(unet / "model.onnx"), load_external_data=False).graph.input}
    assert inputs == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
    # A TensorRT plan of this ONNX gets a batch range for the added conditioning too (built where TensorRT is).
    shapes = profile_shapes(unet / "model.onnx", 8)
    assert shapes["text_embeds"] == ((1, POOLED), (8, POOLED), (8, POOLED)) and shapes["time_ids"] == ((1, 6), (8, 6), (8, 6))


def test_sdxl_refiner_folder_is_one_clear_line(sdxl_dir, clip_folder, tmp_path, capsys):
    import json
    import shutil

    refiner = tmp_path / "refiner"
    shutil.copytree(sdxl_dir, refiner)
    shutil.rmtree(refiner / "text_encoder")
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps(index | {"requires_aesthetics_score": True, "text_encoder": [None, None]}))
    code = main(["render", str(clip_folder), "-o", str(tmp_path / "out.mp4"), "--model", str(refiner), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and "SDXL refiner" in err and "base-architecture" in err, err
    assert not (tmp_path / "out.mp4").exists()


# --- LoRA --------------------------------------------------------------------------------------


def write_sdxl_kohya_lora(path, model, seed: int) -> dict[str, tuple[str, str, torch.Tensor]]:
    """A random SDXL LoRA in kohya's format: lora_unet_…, lora_te1_… (CLIP-L), lora_te2_… (OpenCLIP-G)."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    sources = [("unet", "lora_unet_", model.unet.state_dict(), UNET_TARGETS),
               ("text_encoder", "lora_te1_text_model_", model.text_encoder.state_dict(), TEXT_TARGETS),
               ("text_encoder_2", "lora_te2_text_model_", model.text_encoder_2.state_dict(), TEXT_TARGETS)]
    for module, prefix, state, targets in sources:
        for key, weight in state.items():
            if not (key.endswith(".weight") and weight.ndim in (2, 4) and any(f".{t}." in f".{key}" for t in targets)):
                continue
            name = kohya_name(prefix, key.removeprefix("text_model."))
            down = torch.randn(RANK, weight.shape[1], *weight.shape[2:], generator=g) * 0.4
            up = torch.randn(weight.shape[0], RANK, *([1, 1] if weight.ndim == 4 else []), generator=g) * 0.4
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)})
            deltas[name] = (module, key, (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (ALPHA / RANK))
    save_file(tensors, str(path))
    return deltas


def test_sdxl_lora_fuses_into_the_unet_and_both_encoders_as_diffusers_does(sdxl_model, sdxl_dir, clip_folder, tmp_path):
    """Each weight is W + scale · alpha/rank · up @ down (by hand), and the frames equal diffusers'
    load_lora_weights + fuse_lora on StableDiffusionXLImg2ImgPipeline."""
    path = tmp_path / "style.safetensors"
    deltas = write_sdxl_kohya_lora(path, sdxl_model, seed=4)
    fused = load_model(str(sdxl_dir), CPU, options=_options(loras=(f"{path}:0.7",)))
    assert {module for module, _, _ in deltas.values()} == {"unet", "text_encoder", "text_encoder_2"}
    for module, key, delta in deltas.values():
        want = getattr(sdxl_model, module).state_dict()[key] + 0.7 * delta
        torch.testing.assert_close(getattr(fused, module).state_dict()[key], want, rtol=1e-5, atol=1e-6)
    common = dict(model=str(sdxl_dir), backend="torch", loop_n=1, superimpose_alpha=1.0, steps=4, denoising_strength=0.6,
                  cfg_scale=6.0, seed=21, prompt=PROMPT, negative_prompt="blurry", max_frames=2, sampler_name="Euler a")
    render(build_settings(overrides=dict(common, lora=[f"{path}:0.7"])), str(clip_folder), str(tmp_path / "lora") + "/",
           quiet=True, model=fused)
    render(build_settings(overrides=common), str(clip_folder), str(tmp_path / "plain") + "/", quiet=True, model=sdxl_model)
    got, plain = read_frames(tmp_path / "lora"), read_frames(tmp_path / "plain")
    pipe = _pipeline(sdxl_dir, "Euler a")
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.7)
    for frame_in, frame_out in zip(read_frames(clip_folder)[:2], got):
        assert _max_diff(frame_out, np.asarray(_sdxl(pipe, Image.fromarray(frame_in), 21, 4, 0.6, 6.0))) <= 2
    assert len(got) == 2 and np.mean([np.abs(g.astype(int) - p.astype(int)).mean() for g, p in zip(got, plain)]) > 1


# --- bad input ---------------------------------------------------------------------------------


def test_lora_of_another_family_is_one_line_naming_both(tmp_path):
    """The cross-attention width of the LoRA's attn2 keys names its family: SDXL on SD 1.x and the reverse."""
    from vlrt.errors import VlrtError
    from vlrt.model.lora import _check_family

    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    for width, model_width, words in ((2048, 768, "is for SDXL (cross-attention width 2048) but the model is SD 1.x"),
                                      (768, 2048, "is for SD 1.x (cross-attention width 768) but the model is SDXL")):
        path = tmp_path / f"lora{width}.safetensors"
        save_file({key: torch.zeros(4, width)}, str(path))
        with pytest.raises(VlrtError, match=words.replace("(", r"\(").replace(")", r"\)")):
            _check_family(path, model_width)


@pytest.mark.parametrize("case", ["sdxl_lora_on_sd", "sd_lora_on_sdxl", "vae_latents", "refiner_file"])
def test_sdxl_bad_input_is_one_clear_line(case, sdxl_model, sdxl_dir, demo_model, clip_folder, tmp_path, capsys):
    from vlrt.demo import DEMO_MODEL_DIR

    model, extra = str(sdxl_dir), []
    if case == "sdxl_lora_on_sd":
        write_sdxl_kohya_lora(tmp_path / "x.safetensors", sdxl_model, seed=1)
        model, extra, expected = "demo", ["--lora", str(tmp_path / "x.safetensors")], "cross-attention width 72) but the model is"
    elif case == "sd_lora_on_sdxl":
        from test_lora import write_kohya_lora

        write_kohya_lora(tmp_path / "x.safetensors", demo_model, seed=1)
        extra, expected = ["--lora", str(tmp_path / "x.safetensors")], "cross-attention width 32) but the model is"
    elif case == "vae_latents":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config({**AutoencoderKL.load_config(DEMO_MODEL_DIR / "vae"), "latent_channels": 16})
        vae.save_pretrained(tmp_path / "vae16")
        extra, expected = ["--vae", str(tmp_path / "vae16")], "has 16 latent channels but the model's UNet takes 4"
    else:
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3),
                   "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(8, 8)}, str(tmp_path / "refiner.safetensors"))
        model, expected = str(tmp_path / "refiner.safetensors"), "is an SDXL refiner"
    out = tmp_path / "out.mp4"
    code = main(["render", str(clip_folder), "-o", str(out), "--model", model, *extra, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and expected in err, err
    assert not out.exists() and not list(tmp_path.glob("out.mp4*"))


# --- single files in the original SDXL layout -------------------------------------------------


def test_shipped_sdxl_configs_are_sdxl_base_and_keys_tell_sdxl_and_refiners_apart(tmp_path):
    """The shipped configs build SDXL base 1.0's networks (parameter counts of the released model), and the keys
    tell SDXL base (both embedders) from a refiner (OpenCLIP-G alone)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from vlrt.errors import VlrtError
    from vlrt.model.checkpoints import CONFIGS, detect_architecture

    folder = CONFIGS / "sdxl"
    with init_empty_weights():
        modules = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        }
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    base = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
            "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}
    arch = detect_architecture(base, tmp_path / "x.safetensors")
    assert (arch.is_sdxl, arch.cross_attention_dim, arch.family, arch.config_folder("auto")) == (True, 2048, "SDXL", folder)
    refiner = {"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
               "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}
    with pytest.raises(VlrtError, match="is an SDXL refiner"):
        detect_architecture(refiner, tmp_path / "refiner.safetensors")


@pytest.mark.usefixtures("no_network")
def test_sdxl_single_file_renders_like_its_folder(sdxl_model, sdxl_dir, clip_folder, tmp_path):
    """A file written by an independent diffusers→sgm mapping loads offline to the same weights, and renders the same frames."""
    from original_layout import sdxl_to_original

    from vlrt.model.loading import ModelOptions

    path = tmp_path / "tiny-sdxl.safetensors"
    m = sdxl_model
    save_file({k: v.clone() for k, v in sdxl_to_original(m.unet, m.vae, m.text_encoder, m.text_encoder_2).items()}, str(path))
    single = load_model(str(path), CPU, options=ModelOptions(model_config=str(sdxl_dir)))
    assert single.is_sdxl and single.tokenizer_2.pad_token == "!"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(single, component).state_dict(), getattr(m, component).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    frames = {}
    for name, model in (("folder", m), ("single", single)):
        settings = build_settings(overrides=dict(
            model=str(sdxl_dir if name == "folder" else path), model_config="" if name == "folder" else str(sdxl_dir),
            backend="torch", loop_n=1, steps=4, denoising_strength=0.5, cfg_scale=7.0, seed=11, max_frames=2,
            prompt="a (photo:1.2) of a cat, BREAK oil painting", negative_prompt="blurry",
        ))
        render(settings, str(clip_folder), str(tmp_path / name) + "/", quiet=True, model=model)
        frames[name] = read_frames(tmp_path / name)
    assert len(frames["single"]) == 2 and max(_max_diff(a, b) for a, b in zip(frames["single"], frames["folder"])) == 0


def test_a_render_far_below_sdxl_area_is_warned_once(sdxl_dir, clip_folder, tmp_path, capsys):
    from vlrt.render.pipeline import sdxl_size_warning

    out = tmp_path / "out"
    code = main(["render", str(clip_folder), "-o", str(out) + "/", "--model", str(sdxl_dir), "--loop-n", "2", "--steps", "1",
                 "--max-frames", "1", "--backend", "torch"])
    err = capsys.readouterr().err
    assert code == 0 and err.count("of the 1024×1024 area SDXL models are trained at") == 1, err
    assert "64×48 is 0%" in err
    sdxl = load_model(str(sdxl_dir), CPU)
    assert sdxl_size_warning(sdxl, 768, 768) is None and sdxl_size_warning(sdxl, 640, 640) is not None


def test_masks_fastdvdnet_and_schedules_work_on_sdxl(sdxl_model, sdxl_dir, clip_folder, tmp_path):
    """The rest of the pipeline is the same on SDXL: a mask keeps the right half exactly (full-resolution
    inpainting crops, whose time ids are their SD size), FastDVDNet runs between passes, schedules apply."""
    from test_inpainting import W, _mask_file

    from vlrt.fastdvdnet.network import FastDVDnet

    torch.manual_seed(0)
    save_file(FastDVDnet().state_dict(), str(tmp_path / "fastdvdnet.safetensors"))
    settings = build_settings(overrides=dict(
        model=str(sdxl_dir), backend="torch", steps=4, denoising_strength=0.5, cfg_scale=5.0, seed=5, prompt=PROMPT,
        negative_prompt="blurry", loop_n=2, superimpose_alpha=0.6, use_mask=True, inpaint_full_res=True,
        mask_directory=str(_mask_file(tmp_path / "mask.png")), temporal_superimpose_alpha_list="0.2,0.6,0.2",
        video_post_process_method="fastdvdnet", fastdvdnet_weights=str(tmp_path / "fastdvdnet.safetensors"), denoising_schedule="0.5 if loop_i == 0 else 0.3", max_frames=4,
    ))
    render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=sdxl_model)
    inputs, outputs = read_frames(clip_folder)[:4], read_frames(tmp_path / "out")
    assert len(outputs) == 4
    for frame_in, frame_out in zip(inputs, outputs):
        assert np.array_equal(frame_out[:, W // 2 :], frame_in[:, W // 2 :])
        assert np.abs(frame_out[:, : W // 2].astype(int) - frame_in[:, : W // 2].astype(int)).mean() > 2


def test_the_memory_check_counts_weights_already_loaded_for_torch(sdxl_model, monkeypatch):
    """The torch backend runs the loaded weights in place: memory measured after loading has room for
    the activations alone (SDXL's 13 GB of fp32 weights are not needed twice); ONNX Runtime loads a copy."""
    from vlrt.errors import VlrtError
    from vlrt.render import memory

    weights = sum(p.numel() * 4 for m in (sdxl_model.unet, sdxl_model.vae, *sdxl_model.text_encoders) for p in m.parameters())
    activations = memory.estimate_bytes(sdxl_model, 64, 48, 8, "torch", 4) - weights
    monkeypatch.setattr(memory, "available_bytes", lambda device: activations + 1024)
    common = dict(sized_by_user=True, rows=8, precision="fp32", device=CPU, log=print)
    assert memory.fit_render_size(sdxl_model, 64, 48, backend="torch", **common) == (64, 48)
    with pytest.raises(VlrtError, match="needs about"):
        memory.fit_render_size(sdxl_model, 64, 48, backend="ort", **common)
