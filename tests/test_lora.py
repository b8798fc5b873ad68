"""LoRA files in the kohya/WebUI key format: fused as diffusers fuses them, at the WebUI's scale,
and a changed scale re-weights the exported ONNX instead of exporting it again."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import tomllib
import torch
from conftest import read_frames
from onnx import numpy_helper
from PIL import Image
from safetensors.torch import save_file
from tiny_sd import load_pipeline

from vlrt.cli import main
from vlrt.demo import DEMO_MODEL_DIR
from vlrt.engines.base import UNET
from vlrt.engines.modules import UNetModule
from vlrt.engines.ort_engine import OrtEngine
from vlrt.engines.trt_engine import trt_available
from vlrt.errors import VlrtError
from vlrt.export import onnx_export
from vlrt.export.onnx_export import export_onnx
from vlrt.export.reweight import reweight_onnx
from vlrt.model.loading import ModelOptions, load_model
from vlrt.model.lora import LoraSpec
from vlrt.render.engine_picker import build_engines, sd_networks
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

CPU = torch.device("cpu")
TRT_OK, TRT_WHY = trt_available()
RANK, ALPHA = 4, 2.0
UNET_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "proj_in", "ff.net.2", "resnets.0.conv1")
TEXT_TARGETS = ("q_proj", "v_proj", "out_proj", "fc1")


def kohya_name(prefix: str, key: str) -> str:
    return prefix + key.removesuffix(".weight").replace(".", "_")


def write_kohya_lora(path, model, seed: int, strength: float = 0.4) -> dict[str, tuple[str, str, torch.Tensor]]:
    """A random LoRA in kohya's format (lora_unet_… / lora_te_…, lora_down, lora_up, alpha) for the
    model's UNet and text encoder; returns {kohya name: (module, weight key, full-rank delta)}."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    sources = [("unet", "lora_unet_", model.unet.state_dict(), UNET_TARGETS),
               ("text_encoder", "lora_te_text_model_", model.text_encoder.state_dict(), TEXT_TARGETS)]
    for module, prefix, state, targets in sources:
        for key, weight in state.items():
            if not (key.endswith(".weight") and weight.ndim in (2, 4) and any(f".{t}." in f".{key}" for t in targets)):
                continue
            name = kohya_name(prefix, key)
            down = torch.randn(RANK, weight.shape[1], *weight.shape[2:], generator=g) * strength
            up = torch.randn(weight.shape[0], RANK, *([1, 1] if weight.ndim == 4 else []), generator=g) * strength
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)})
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (ALPHA / RANK)
            deltas[name] = (module, key, delta)
    save_file(tensors, str(path))
    return deltas


@pytest.fixture(scope="module")
def lora_files(demo_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    a, b = root / "style_a.safetensors", root / "style_b.safetensors"
    return {"a": (a, write_kohya_lora(a, demo_model, seed=1)), "b": (b, write_kohya_lora(b, demo_model, seed=2))}


def test_spec_parsing():
    assert LoraSpec.parse("x/style.safetensors") == LoraSpec(LoraSpec.parse("x/style.safetensors").path, 1.0)
    assert LoraSpec.parse("x/style.safetensors:0.6").scale == 0.6
    assert str(LoraSpec.parse(r"C:\loras\a.safetensors").path) == r"C:\loras\a.safetensors"
    assert LoraSpec.parse(r"C:\loras\a.safetensors:-0.5").scale == -0.5


def test_two_loras_fuse_as_the_sum_of_their_scaled_deltas(demo_model, lora_files):
    """The hand computation: W + scale · alpha/rank · up @ down for each LoRA, as the WebUI applies them."""
    (a, deltas_a), (b, deltas_b) = lora_files["a"], lora_files["b"]
    fused = load_model("demo", CPU, options=ModelOptions(loras=(f"{a}:0.5", f"{b}:-1.25")))
    assert len(deltas_a) == len(deltas_b) > 10
    for name, (module, key, delta_a) in deltas_a.items():
        base = getattr(demo_model, module).state_dict()[key]
        want = base + 0.5 * delta_a - 1.25 * deltas_b[name][2]
        torch.testing.assert_close(getattr(fused, module).state_dict()[key], want, rtol=1e-5, atol=1e-6)
    untouched = "encoder.layers.0.layer_norm1.weight"
    assert torch.equal(fused.text_encoder.state_dict()[untouched], demo_model.text_encoder.state_dict()[untouched])
    assert [(entry["scale"], entry["sha256"]) for entry in fused.loras] == [
        (0.5, hashlib.sha256(a.read_bytes()).hexdigest()), (-1.25, hashlib.sha256(b.read_bytes()).hexdigest())
    ]


def test_lora_frames_equal_diffusers_load_lora_weights_and_fuse_lora(demo_model, lora_files, clip_folder, tmp_path):
    path, _ = lora_files["a"]
    steps, strength, cfg, seed, prompt, negative = 6, 0.6, 6.0, 21, "a striped pattern", "blurry"
    common = dict(model="demo", backend="torch", loop_n=1, superimpose_alpha=1.0, steps=steps, denoising_strength=strength,
                  cfg_scale=cfg, seed=seed, prompt=prompt, negative_prompt=negative, max_frames=2, sampler_name="Euler a")
    render(build_settings(overrides=dict(common, lora=[f"{path}:0.8"])), str(clip_folder), str(tmp_path / "lora") + "/", quiet=True)
    render(build_settings(overrides=common), str(clip_folder), str(tmp_path / "plain") + "/", quiet=True, model=demo_model)
    got, plain = read_frames(tmp_path / "lora"), read_frames(tmp_path / "plain")

    pipe = load_pipeline(DEMO_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    for frame_in, frame_out in zip(read_frames(clip_folder)[:2], got):
        want = pipe(prompt=prompt, negative_prompt=negative, image=Image.fromarray(frame_in), strength=strength,
                    num_inference_steps=steps, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed)).images[0]
        assert np.abs(frame_out.astype(int) - np.asarray(want).astype(int)).max() <= 2
    assert len(got) == 2
    assert np.mean([np.abs(g.astype(int) - p.astype(int)).mean() for g, p in zip(got, plain)]) > 1  # the LoRA mattered
    recorded = tomllib.loads((tmp_path / "lora" / "settings.toml").read_text())
    assert recorded["render"]["lora"] == [f"{path}:0.8"]
    assert recorded["vlrt"]["lora"] == [{"path": str(path), "scale": 0.8, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]


def test_resume_refuses_a_lora_file_whose_contents_changed(demo_model, lora_files, clip_folder, tmp_path, capsys):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(lora_files["a"][0].read_bytes())
    out = tmp_path / "out"
    args = ["render", str(clip_folder), "-o", str(out) + "/", "--model", "demo", "--lora", str(path), "--loop-n", "1",
            "--steps", "2", "--max-frames", "2", "--seed", "1", "--backend", "torch", "--quiet"]
    assert main(args) == 0
    settings_file = out / "settings.toml"
    settings_file.write_text(settings_file.read_text().replace("complete = true", "complete = false"))
    (out / "000001.png").unlink()
    write_kohya_lora(path, demo_model, seed=9)
    assert main([*args, "--resume"]) != 0
    assert "LoRA files are not those the interrupted render used" in capsys.readouterr().err


# --- a changed scale re-weights the ONNX export ----------------------------------------------


@pytest.fixture
def count_exports(monkeypatch):
    calls = []
    real = onnx_export.export_onnx

    def counting(component, *args, **kwargs):
        calls.append(component)
        return real(component, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", counting)
    return calls


def test_changing_only_the_lora_scale_reweights_the_onnx_instead_of_exporting(lora_files, tmp_path, count_exports):
    path, _ = lora_files["a"]
    engines_dir, logs = tmp_path / "engines", []

    def engines_for(scale: float):
        model = load_model("demo", CPU, options=ModelOptions(loras=(f"{path}:{scale}",)))
        networks = [n for n in sd_networks(model, 32, 32) if n.component == UNET]  # the VAE is not what a LoRA changes
        return model, build_engines(networks, "ort", device=CPU, max_batch=2, precision="fp32", engines_dir=engines_dir, log=logs.append)

    engines_for(1.0)
    assert count_exports == ["unet"]
    model, engines = engines_for(0.4)
    assert count_exports == ["unet"]  # nothing exported again
    assert any("re-weighting" in line and "unet" in line for line in logs)
    unet_folders = sorted(p for p in engines_dir.iterdir() if p.is_dir() and "-unet-" in p.name)
    assert len(unet_folders) == 2  # one per scale: another weights hash

    reweighted = engines[UNET].engine_for(77).path
    fresh = tmp_path / "fresh" / "model.onnx"
    module = UNetModule(model.unet)
    example = sd_networks(model, 32, 32)[0].example
    export_onnx(UNET, module, example, fresh)
    a, b = onnx.load(str(reweighted)).graph, onnx.load(str(fresh)).graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.node] == [(n.op_type, list(n.input), list(n.output)) for n in b.node]
    init_a = {i.name: numpy_helper.to_array(i) for i in a.initializer}
    init_b = {i.name: numpy_helper.to_array(i) for i in b.initializer}
    assert init_a.keys() == init_b.keys() and all(np.array_equal(init_a[k], init_b[k]) for k in init_a)

    g = torch.Generator().manual_seed(3)
    feed = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([700.5, 31.0]),
            "encoder_hidden_states": torch.randn(2, 77, model.cross_attention_dim, generator=g)}
    got = engines[UNET](**feed)["noise_pred"]
    want = OrtEngine(UNET, fresh, max_batch=2, device=CPU)(**feed)["noise_pred"]
    assert torch.equal(got, want)
    with torch.no_grad():
        assert (got - module(**feed)).abs().max().item() < 1e-4


@pytest.mark.parametrize("weights", ["embedded", "external"])
def test_reweighting_refuses_when_weights_that_shared_an_initializer_part(demo_model, tmp_path, monkeypatch, weights):
    """The export stores equal parameters once (a fresh UNet's norm weights are all ones); if the new
    weights make them differ, the graph would differ: re-weighting refuses, so the caller exports.
    With external data (the SD 1.5 and SDXL UNets), the old values are read from the data file in place."""
    if weights == "external":
        monkeypatch.setattr(onnx_export, "EMBEDDED_LIMIT", 0)
    torch.manual_seed(0)
    module = UNetModule(type(demo_model.unet).from_config(demo_model.unet.config)).eval()
    example = sd_networks(demo_model, 32, 32)[0].example
    base = tmp_path / "base" / "model.onnx"
    export_onnx(UNET, module, example, base)
    names = {i.name for i in onnx.load(str(base)).graph.initializer}
    shared = [k for k in module.state_dict() if k not in names]
    assert shared
    with torch.no_grad():
        module.unet.conv_in.weight.mul_(1.5)  # a weight of its own changes: re-weighted, not refused
    same = tmp_path / "same" / "model.onnx"
    assert reweight_onnx(base, module, same, "fp32")
    assert same.with_name(same.name + ".data").is_file() == (weights == "external")
    g = torch.Generator().manual_seed(5)
    feed = {name: torch.randn(value.shape, generator=g) for name, value in example.items()}
    feed["timestep"] = torch.tensor([321.0])
    got = OrtEngine(UNET, same, max_batch=2, device=CPU)(**feed)["noise_pred"]
    with torch.no_grad():
        assert (got - module(**feed)).abs().max().item() < 1e-4
        module.state_dict()[shared[0]].add_(0.5)
    assert not reweight_onnx(base, module, tmp_path / "parted" / "model.onnx", "fp32")


# --- LoRAs that do not fit -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["other_architecture", "wrong_shapes", "not_a_lora", "missing"])
def test_a_lora_that_does_not_fit_is_one_clear_line_naming_the_file(case, clip_folder, tmp_path, capsys):
    path = tmp_path / f"{case}.safetensors"
    if case == "other_architecture":  # SDXL's kohya names (ldm block names, two text encoders)
        save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight": torch.zeros(4, 640),
                   "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_up.weight": torch.zeros(640, 4),
                   "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
                   "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}, str(path))
    elif case == "wrong_shapes":  # SD 1.5 sizes (320) on the demo model (48)
        name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        save_file({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4)}, str(path))
    elif case == "not_a_lora":
        save_file({"foo.weight": torch.zeros(3, 3)}, str(path))
    out = tmp_path / "out.mp4"
    code = main(["render", str(clip_folder), "-o", str(out), "--model", "demo", "--lora", f"{path}:0.7", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err, err
    assert f"LoRA {path}" in err, err
    assert ("does not exist" if case == "missing" else "does not fit this model") in err, err
    if case == "wrong_shapes":
        assert "size mismatch" in err
    assert not out.exists()


def test_lora_is_a_list_setting(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('lora = ["a.safetensors:0.5", "b.safetensors"]\n')
    from vlrt.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["render", "in", "-o", "out", "--config", str(config)])
    assert settings_from_args(args).lora == ["a.safetensors:0.5", "b.safetensors"]
    args = build_parser().parse_args(["render", "in", "-o", "out", "--config", str(config), "--lora", "c:2", "--lora", "d"])
    assert settings_from_args(args).lora == ["c:2", "d"]  # the command line replaces the config's list
    assert build_settings({"lora": "one.safetensors"}).lora == ["one.safetensors"]
    with pytest.raises(VlrtError, match="lora"):
        build_settings({"lora": [1, 2]})


# --- <lora:NAME:SCALE> tags in prompts --------------------------------------------------------


def test_a_prompt_tag_renders_the_frames_of_the_same_lora_given_as_a_flag(lora_files, clip_folder, tmp_path):
    """`<lora:style_a:0.8>` found under --lora-dir, taken out of the text, equals `--lora style_a:0.8`
    (shown equal to diffusers' fuse_lora above) on a prompt without the tag."""
    path, _ = lora_files["a"]
    nested = tmp_path / "Lora" / "styles"
    nested.mkdir(parents=True)
    (nested / path.name).write_bytes(path.read_bytes())
    common = dict(model="demo", backend="torch", loop_n=2, superimpose_alpha=1.0, steps=6, denoising_strength=0.6, cfg_scale=6.0,
                  seed=21, max_frames=2,
                  negative_prompt="blurry")
    render(build_settings(overrides=dict(common, prompt="a striped pattern, <lora:style_a:0.8>", lora_dir=str(tmp_path / "Lora"))),
           str(clip_folder), str(tmp_path / "tag") + "/", quiet=True)
    render(build_settings(overrides=dict(common, prompt="a striped pattern, ", lora=[f"{path}:0.8"])),
           str(clip_folder), str(tmp_path / "flag") + "/", quiet=True)
    render(build_settings(overrides=dict(common, prompt="a striped pattern, ")), str(clip_folder), str(tmp_path / "none") + "/", quiet=True)
    tag, flag, none = (read_frames(tmp_path / name) for name in ("tag", "flag", "none"))
    assert len(tag) == 2 and all(np.array_equal(a, b) for a, b in zip(tag, flag))
    assert np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(tag, none)]) > 1  # the LoRA was applied
    recorded = tomllib.loads((tmp_path / "tag" / "settings.toml").read_text())["vlrt"]["lora"]
    assert recorded == [{"path": str(nested / path.name), "scale": 0.8, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_dir", "needs --lora-dir FOLDER"),
        ("missing", "there is no nowhere.safetensors in --lora-dir"),
        ("also_a_flag", "is given by --lora and by the prompt's <lora:style_a:1>"),
        ("schedule_differs", "asks for <lora:style_a:0.5> but the render fused <lora:style_a:1>"),
        ("schedule_drops", "asks for no <lora:…> tag but the render fused <lora:style_a:1>"),
        ("unsupported", "<hypernet:x:1> is not supported"),
    ],
)
def test_a_prompt_tag_that_cannot_be_applied_is_one_clear_line(case, message, lora_files, clip_folder, tmp_path, capsys):
    path, _ = lora_files["a"]
    prompt = {"missing": "a cat <lora:nowhere:1>", "unsupported": "a cat <hypernet:x:1>"}.get(case, "a cat <lora:style_a:1>")
    args = ["render", str(clip_folder), "-o", str(tmp_path / "out.mp4"), "--model", "demo", "--backend", "torch",
            "--max-frames", "2", "--steps", "2", "--prompt", prompt, "--quiet"]
    if case != "no_dir":
        args += ["--lora-dir", str(path.parent)]
    if case == "also_a_flag":
        args += ["--lora", str(path)]
    if case == "schedule_differs":
        args += ["--prompt-schedule", "'a cat <lora:style_a:0.5>' if image_i > 1 else 'a cat <lora:style_a:1>'"]
    if case == "schedule_drops":
        args += ["--prompt-schedule", "'a dog'"]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err, err
    assert message in err, err
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.trt
@pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)
def test_on_tensorrt_a_scale_change_refits_the_unet_plan_instead_of_rebuilding(lora_files, tmp_path, monkeypatch):
    from vlrt.export import trt_build

    builds = []
    real = trt_build.build_plan
    monkeypatch.setattr(trt_build, "build_plan", lambda component, *a, **k: (builds.append(component), real(component, *a, **k))[1])
    cuda = torch.device("cuda", torch.cuda.current_device())
    path, _ = lora_files["a"]
    outputs = []
    g = torch.Generator().manual_seed(5)
    feed = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([500.0, 20.5]),
            "encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}
    for scale in (1.0, 0.4):
        model = load_model("demo", cuda, options=ModelOptions(loras=(f"{path}:{scale}",)))
        engines = build_engines(sd_networks(model, 32, 32), "trt", device=cuda, max_batch=2, precision="fp16",
                                engines_dir=tmp_path / "engines", log=lambda m: None)
        outputs.append((engines[UNET](**{k: v.to(cuda) for k, v in feed.items()})["noise_pred"].cpu(), model))
    assert sorted(builds) == ["unet", "vae_decoder", "vae_encoder"]  # the second UNet plan was refitted
    got, model = outputs[1]
    with torch.no_grad():
        want = UNetModule(model.unet)(**{k: v.to(cuda) for k, v in feed.items()}).float().cpu()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()
