"""The WebUI prompt syntax: parsing, 75-token chunks, weighted embeddings, CLIP skip.

Expected parses are the WebUI's documented examples and hand-worked cases; embeddings are checked
against hand computations on the demo model's text encoder, never against vlrt's own output.
"""

from __future__ import annotations

import copy

import pytest
import torch

from vlrt.errors import VlrtError
from vlrt.model.conditioning import conditioning_pair
from vlrt.model.prompt_embeddings import PromptEncoder
from vlrt.model.prompt_syntax import BREAK, CHUNK_TOKENS, Fragment, LoraTag, chunk_prompt, parse_prompt, split_lora_tags

CPU = torch.device("cpu")


def parsed(text: str) -> list[tuple[str, float] | str]:
    return ["BREAK" if f.is_break else (f.text, round(f.weight, 6)) for f in parse_prompt(text)]


@pytest.mark.parametrize(
    "text, want",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("((double))", [("double", 1.21)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("( word : 0.5 )", [(" word ", 0.5)]),
        ("(-neg:-1)", [("-neg", -1.0)]),
        ("[word]", [("word", round(1 / 1.1, 6))]),
        ("[[word]]", [("word", round(1 / 1.21, 6))]),
        ("((a:1.5))", [("a", 1.65)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"\[x\) \\ y", [("[x) \\ y", 1.0)]),
        (r"a\b", [("ab", 1.0)]),  # a backslash before anything else is dropped
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("[unbalanced", [("unbalanced", round(1 / 1.1, 6))]),
        ("stray) and] closers", [("stray) and] closers", 1.0)]),
        ("(a:1.5", [("a:1.5", 1.1)]),
        ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)],
        ),
        ("a BREAK b", [("a", 1.0), "BREAK", ("b", 1.0)]),
        ("a, BREAK,b", [("a,", 1.0), "BREAK", (",b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), "BREAK", ("b", 1.1)]),
        ("BREAKFAST break", [("BREAKFAST break", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse(text, want):
    assert parsed(text) == want


def tokens_of(count: int) -> str:
    """A prompt of `count` words that each tokenize to one token with the demo's byte-level tokenizer."""
    return " ".join("x" for _ in range(count))


def by_word(text: str) -> list[int]:
    """A stand-in tokenizer: one token per word, ',' is token 0 (every word a token, like CLIP's common words)."""
    return [0 if word == "," else 1 + len(word) for word in text.replace(",", " , ").split()]


@pytest.mark.parametrize("count, sizes", [(0, [0]), (75, [75]), (76, [75, 1]), (150, [75, 75]), (151, [75, 75, 1])])
def test_chunks_of_75(count, sizes):
    chunks = chunk_prompt([Fragment(tokens_of(count))], by_word, comma=0)
    assert [len(c.tokens) for c in chunks] == sizes


def test_break_closes_the_chunk_even_when_empty():
    frag = [Fragment("a b"), BREAK, BREAK, Fragment("c")]
    assert [c.tokens for c in chunk_prompt(frag, by_word, comma=0)] == [[2, 2], [], [2]]
    assert len(chunk_prompt([BREAK, Fragment("a")], by_word, 0)) == 2
    assert len(chunk_prompt([Fragment("a"), BREAK], by_word, 0)) == 1


def test_chunk_break_moves_back_to_a_recent_comma():
    # 70 words, a comma, 10 more: the chunk fills at 75 and the 4 words after the comma move on.
    text = tokens_of(70) + " , " + " ".join(["yy"] * 10)
    chunks = chunk_prompt([Fragment(text)], by_word, comma=0)
    assert [len(c.tokens) for c in chunks] == [71, 10]
    assert chunks[0].tokens[-1] == 0 and chunks[1].tokens == [3] * 10
    # a comma more than 20 tokens back does not move anything
    far = tokens_of(50) + " , " + tokens_of(30)
    assert [len(c.tokens) for c in chunk_prompt([Fragment(far)], by_word, comma=0)] == [75, 6]


def test_weights_follow_their_tokens():
    chunks = chunk_prompt(parse_prompt("a (b c:1.5) [d]"), by_word, comma=0)
    assert chunks[0].weights == pytest.approx([1.0, 1.5, 1.5, 1 / 1.1])


# --- embeddings ----------------------------------------------------------------------------


def ids_of(tokenizer, *pieces: str) -> list[int]:
    out = []
    for piece in pieces:
        out += tokenizer(piece, add_special_tokens=False).input_ids
    return out


def chunk_ids(tokenizer, tokens: list[int]) -> torch.Tensor:
    pad = [tokenizer.pad_token_id] * (CHUNK_TOKENS - len(tokens))
    return torch.tensor([[tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id, *pad]])


@torch.no_grad()
def test_weighted_token_embedding_with_mean_restoration(demo_model):
    tok, te = demo_model.tokenizer, demo_model.text_encoder
    a, cat = ids_of(tok, "a "), ids_of(tok, "cat")
    z = te(chunk_ids(tok, a + cat))[0][0]
    w = torch.ones(77)
    w[1 + len(a) : 1 + len(a) + len(cat)] = 1.5
    want = z * w[:, None]
    want = want * (z.mean() / want.mean())
    got = PromptEncoder(tok, te, CPU)("a (cat:1.5)")
    assert got.shape == (1, 77, te.config.hidden_size)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)
    # the weighting really changed the cat tokens, and only relative to the mean
    plain = te(chunk_ids(tok, a + cat))[0][0]
    assert not torch.allclose(got[0, 1 + len(a)], plain[1 + len(a)])


@torch.no_grad()
def test_plain_prompt_equals_the_standard_encoding(demo_model):
    tok, te = demo_model.tokenizer, demo_model.text_encoder
    ids = tok("a striped pattern", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(PromptEncoder(tok, te, CPU)("a striped pattern"), te(ids)[0])


@torch.no_grad()
def test_a_150_token_prompt_is_two_chunks_encoded_separately(demo_model):
    tok, te = demo_model.tokenizer, demo_model.text_encoder
    text = " ".join(["x"] * 150)
    assert len(ids_of(tok, text)) == 150
    encoder = PromptEncoder(tok, te, CPU)
    assert [len(c.tokens) for c in encoder.chunks(text)] == [75, 75]
    got = encoder(text)
    chunk = te(chunk_ids(tok, ids_of(tok, " ".join(["x"] * 75))))[0]
    assert got.shape == (1, 154, te.config.hidden_size)
    torch.testing.assert_close(got, torch.cat([chunk, chunk], dim=1), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_cond_and_uncond_are_padded_with_empty_chunks(demo_model):
    tok, te = demo_model.tokenizer, demo_model.text_encoder
    encoder = PromptEncoder(tok, te, CPU)
    long = "a BREAK b BREAK c"
    cond, uncond = conditioning_pair([encoder], long, "", 20, (32, 32))
    empty = te(chunk_ids(tok, []))[0]
    assert cond.shapes == uncond.shapes == (("encoder_hidden_states", (1, 3 * 77, te.config.hidden_size)),)
    torch.testing.assert_close(uncond.at(0)["encoder_hidden_states"], empty.repeat(1, 3, 1), rtol=1e-5, atol=1e-6)
    assert encoder(long) is cond.at(0)["encoder_hidden_states"]  # cached per distinct text
    short_cond, long_uncond = conditioning_pair([encoder], "", long, 20, (32, 32))
    assert short_cond.shapes == long_uncond.shapes


@torch.no_grad()
def test_clip_skip_2_is_the_penultimate_layer_then_the_final_norm(demo_model):
    tok, te = demo_model.tokenizer, demo_model.text_encoder
    ids = chunk_ids(tok, ids_of(tok, "soft colours"))
    shorter = copy.deepcopy(te)
    layers = shorter.encoder.layers if hasattr(shorter, "encoder") else shorter.text_model.encoder.layers
    del layers[-1]  # the model's own forward then ends with the penultimate layer and the final norm
    want = shorter(ids)[0]
    got = PromptEncoder(tok, te, CPU, clip_skip=2)("soft colours")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, PromptEncoder(tok, te, CPU)("soft colours"))


def test_clip_skip_out_of_range_is_a_clear_error(demo_model):
    with pytest.raises(VlrtError, match="clip_skip 3 is out of range: this text encoder has 2 layers"):
        PromptEncoder(demo_model.tokenizer, demo_model.text_encoder, CPU, clip_skip=3)


# --- long prompts on static-length engines -------------------------------------------------


def test_long_prompts_get_their_own_onnx_unet_and_match_torch(demo_model, tmp_path):
    """ONNX UNets have a static prompt length: rows of a 150-token prompt (2 chunks) get a 154-token
    engine of their own, built on first use, that computes what torch computes."""
    from vlrt.engines.base import UNET
    from vlrt.engines.modules import UNetModule
    from vlrt.render.engine_picker import build_engines, sd_networks

    long = " ".join(["x"] * 150)  # 150 tokens with the demo tokenizer: two chunks
    cond, uncond = (e.at(0)["encoder_hidden_states"] for e in demo_model.encode_pair(long, "blurry", 20, (32, 32)))
    assert cond.shape[1] == uncond.shape[1] == 154
    networks = [n for n in sd_networks(demo_model, 32, 32) if n.component == UNET]
    engines = build_engines(networks, "ort", device=CPU, max_batch=4, precision="fp32", engines_dir=tmp_path, log=lambda m: None)
    g = torch.Generator().manual_seed(0)
    feed = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([600.0, 75.5]),
            "encoder_hidden_states": torch.cat([uncond, cond])}
    got = engines[UNET](**feed)["noise_pred"]
    with torch.no_grad():
        want = UNetModule(demo_model.unet)(**feed)
    assert (got - want).abs().max().item() < 1e-4
    folders = sorted(p.name.split("-")[3] for p in tmp_path.iterdir() if p.is_dir() and "-unet-" in p.name)
    assert folders == ["t154", "t77"]
    short = {**feed, "encoder_hidden_states": torch.cat([demo_model.encode_prompt("a")] * 2)}
    assert engines[UNET](**short)["noise_pred"].shape == (2, 4, 16, 16)
    assert sorted(engines[UNET].engines) == [77, 154]


@pytest.mark.parametrize(
    "text, want_text, want_tags",
    [
        ("a cat, <lora:ink:0.7>", "a cat, ", (LoraTag("ink", 0.7),)),
        ("<lora:ink> a cat <lora:grain_2:-0.5>", " a cat ", (LoraTag("ink", 1.0), LoraTag("grain_2", -0.5))),
        ("(a cat:1.2) <lora: ink : 1.5 >", "(a cat:1.2) ", (LoraTag("ink", 1.5),)),
        ("a <cat> and a < b", "a <cat> and a < b", ()),  # no kind:args, no tag
    ],
)
def test_lora_tags_are_taken_out_of_the_prompt(text, want_text, want_tags):
    assert split_lora_tags(text) == (want_text, want_tags)


@pytest.mark.parametrize(
    "text, message",
    [
        ("<hypernet:anime:1>", "not supported"),
        ("<lyco:x:0.5>", "not supported"),
        ("<lora:ink:0.5:0.8>", "one numeric scale"),
        ("<lora:ink:te=0.5>", "one numeric scale"),
        ("<lora::0.5>", "one numeric scale"),
        ("<lora:ink:0.5> <lora:ink:0.6>", "twice"),
    ],
)
def test_tags_vlrt_does_not_apply_are_refused_not_encoded_as_text(text, message):
    with pytest.raises(VlrtError, match=message):
        split_lora_tags(text)


@pytest.mark.parametrize("text, want", [
    ("[(cat:1.2)]", [("cat", round(1.2 / 1.1, 6))]),
    (r"\[a:b\]", [("[a:b]", 1.0)]),
    ("(a:1.1) [b] c:d", [("a", 1.1), (" ", 1.0), ("b", round(1 / 1.1, 6)), (" c:d", 1.0)]),
])
def test_colons_in_weights_escapes_and_plain_text_are_no_prompt_editing(text, want):
    assert parsed(text) == want
