"""Textual-inversion embeddings from an embeddings folder: frames against diffusers' pipeline after its
own `load_textual_inversion`, the chunk count, the settings record, and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_frames
from PIL import Image
from safetensors.torch import save_file
from tiny_sd import load_pipeline

from vlrt.cli import main
from vlrt.errors import VlrtError
from vlrt.model.prompt_embeddings import PromptEncoder
from vlrt.model.textual_inversion import read_folder
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings

CPU = torch.device("cpu")
NAME = "zebrastyle"
PROMPT = f"{NAME}, a striped pattern"


def _vectors(count: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def _save(folder: Path, fmt: str, vectors: torch.Tensor, name: str = NAME) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":  # the WebUI's own format
        path = folder / f"{name}.pt"
        torch.save({"string_to_param": {"*": vectors}, "name": name, "step": 1000}, path)
    else:  # the WebUI's and kohya's .safetensors
        path = folder / "sub" / f"{name}.safetensors"  # subfolders are searched
        path.parent.mkdir(exist_ok=True)
        save_file({"emb_params": vectors.contiguous()}, path)
    return path


def _render(model, clip_folder, out: Path, prompt: str, embeddings_dir: str = "") -> list[np.ndarray]:
    settings = build_settings(overrides=dict(
        model=str(model.path), backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name="Euler", steps=6,
        denoising_strength=0.75, cfg_scale=6.0, seed=5, prompt=prompt, negative_prompt="blurry", max_frames=2,
        embeddings_dir=embeddings_dir,
    ))
    render(settings, str(clip_folder), str(out) + "/", quiet=True, model=None if embeddings_dir else model)
    return read_frames(out)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_an_embedding_renders_as_diffusers_load_textual_inversion(demo_model, clip_folder, tmp_path, fmt):
    width = demo_model.text_encoder.get_input_embeddings().embedding_dim
    path = _save(tmp_path / "embeddings", fmt, _vectors(3, width))
    got = _render(demo_model, clip_folder, tmp_path / "out", PROMPT, str(tmp_path / "embeddings"))
    pipe = load_pipeline(demo_model.path)
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(path), token=NAME)
    for f, frame in enumerate(read_frames(clip_folder)[:2]):
        want = np.asarray(pipe(prompt=PROMPT, negative_prompt="blurry", image=Image.fromarray(frame), strength=0.75,
                               num_inference_steps=6, guidance_scale=6.0,
                               generator=torch.Generator("cpu").manual_seed(5)).images[0])
        assert np.abs(got[f].astype(int) - want.astype(int)).max() <= 2
    # the test can fail: the name read as text renders something else
    text = _render(demo_model, clip_folder, tmp_path / "text", PROMPT)
    assert np.abs(text[0].astype(int) - got[0].astype(int)).max() > 2
    saved = (tmp_path / "out" / "settings.toml").read_text(encoding="utf-8")
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() in saved and "embeddings_dir" in saved


def test_vectors_count_toward_the_chunk_and_are_never_split(demo_model, tmp_path):
    tok, te = demo_model.tokenizer, demo_model.text_encoder
    width = te.get_input_embeddings().embedding_dim
    _save(tmp_path / "emb", "pt", _vectors(10, width), name="zz")
    words = " ".join(["x"] * 66)  # 66 tokens with the demo's byte-level tokenizer
    plain = PromptEncoder(tok, te, CPU)
    assert [len(c.tokens) for c in plain.chunks(f"{words} zz")] == [68]  # "zz" as text: 2 tokens, one chunk
    encoder = PromptEncoder(tok, te, CPU, embeddings=read_folder(tmp_path / "emb"))
    chunks = encoder.chunks(f"{words} ZZ")  # case does not matter (CLIP lower-cases)
    assert [len(c.tokens) for c in chunks] == [66, 10]  # 66 + 10 > 75: the vectors start the next chunk
    assert [(offset, v.name) for offset, v in chunks[1].fixes] == [(0, "zz")]
    assert encoder(f"{words} zz").shape == (1, 154, width)
    assert [len(c.tokens) for c in encoder.chunks(f"{words} zza")] == [69]  # tokens z, z, a</w>: no match, text
    # tokens z, z, z</w> end with the name's z, z</w>: matched in token space, as the WebUI matches
    assert [len(c.tokens) for c in encoder.chunks(f"{words} zzz")] == [67, 10]


def test_the_longest_name_wins(demo_model, tmp_path):
    tok, te = demo_model.tokenizer, demo_model.text_encoder
    width = te.get_input_embeddings().embedding_dim
    _save(tmp_path / "emb", "pt", _vectors(2, width), name="bad")
    _save(tmp_path / "emb", "pt", _vectors(4, width, seed=1), name="bad hands")
    chunks = PromptEncoder(tok, te, CPU, embeddings=read_folder(tmp_path / "emb")).chunks("a cat, bad hands")
    assert [v.name for _, v in chunks[0].fixes] == ["bad hands"]


def _bad(folder: Path, kind: str, width: int) -> None:
    folder.mkdir(parents=True)
    if kind == "wrong width":
        torch.save({"string_to_param": {"*": _vectors(2, width + 8)}}, folder / f"{NAME}.pt")
    elif kind == "corrupt safetensors":
        (folder / f"{NAME}.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif kind == "corrupt pt":
        (folder / f"{NAME}.pt").write_bytes(b"PK\x03\x04 truncated zip")


@pytest.mark.parametrize("kind, words", [
    ("wrong width", "vectors 40 wide, but this model's text encoder takes 32"),
    ("corrupt safetensors", "could not be read"),
    ("corrupt pt", "could not be read"),
])
def test_bad_embedding_files_are_one_line_naming_them(demo_model, clip_folder, tmp_path, capsys, kind, words):
    _bad(tmp_path / "emb", kind, demo_model.text_encoder.get_input_embeddings().embedding_dim)
    out = tmp_path / "out.mp4"
    code = main(["render", str(clip_folder), "-o", str(out), "--model", "demo", "--loop-n", "1", "--steps", "2",
                 "--embeddings-dir", str(tmp_path / "emb"), "--prompt", PROMPT, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("vlrt: error: ") and "\n" not in err, err
    assert words in err and NAME in err
    assert not out.exists()


def test_unused_bad_files_and_names_without_files_are_no_error(demo_model, tmp_path):
    _bad(tmp_path / "emb", "wrong width", 32)
    encoder = PromptEncoder(demo_model.tokenizer, demo_model.text_encoder, CPU, embeddings=read_folder(tmp_path / "emb"))
    assert encoder.chunks("a striped pattern, easynegative")[0].fixes == []
    with pytest.raises(VlrtError, match=NAME):
        encoder.chunks(f"a {NAME}")


def test_a_file_holding_code_is_refused_never_run(demo_model, tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / f"{NAME}.bin").write_bytes(pickle.dumps({"<tok>": Boom()}))
    (file,) = read_folder(tmp_path / "emb")
    assert "code is never run" in file.problem
