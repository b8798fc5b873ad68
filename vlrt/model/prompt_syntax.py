"""The WebUI's prompt syntax: emphasis weights, BREAK, and prompts cut into 75-token chunks.

Written from the WebUI's documented behaviour (its wiki and the examples it documents), not from
its code:

- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)`
  multiplies it by 1.3; nested brackets multiply (`((text))` is 1.21).
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters; a backslash before anything
  else is dropped.
- Unbalanced brackets: a `(` or `[` that is never closed applies to everything after it up to
  the end of the prompt; a `)` or `]` with nothing open is literal text; `(text:w` without its
  `)` keeps `:w` as text. A weight that is not a number (`(a:1.2.3)`) is text too (the WebUI
  fails on it).
- `BREAK` (upper case, a word of its own) ends the current chunk, also inside brackets.
- Neighbouring pieces of equal weight are joined before tokenizing, so `(a)(b)` reads as `ab`.
- `<lora:NAME>` and `<lora:NAME:SCALE>` (the WebUI's extra-network tags) are no text: the render
  fuses those LoRAs (`vlrt.model.lora`) and `split_lora_tags` takes the tags out before tokenizing.
- Prompt editing `[from:to:when]` and alternation `[a|b]` are resolved before this, into the text
  of each sampling step (`prompt_schedule`); what reaches here is such a text.

Chunks: the tokens of each piece (tokenized separately, without start and end tokens) are
filled into chunks of 75; a textual-inversion embedding's name in them becomes its vectors, one
token each, never cut between chunks (`textual_inversion`). When a chunk is full and the next
token is not a comma, the tokens after the chunk's last comma (an embedding's vectors with them)
move on to the next chunk if that comma is among its last 20 tokens, so a phrase is not cut in
two. (The WebUI leaves moved vectors behind, in the first chunk's padding: a bug not copied.) Each chunk is then wrapped in the start and end tokens
and padded to 77 (see `prompt_embeddings`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vlrt.errors import VlrtError
from vlrt.model.textual_inversion import Vectors

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20

_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPABLE = "()[]\\"
_EXTRA_NETWORK = re.compile(r"<(\w+):([^<>]*)>")


@dataclass(frozen=True)
class Fragment:
    """A piece of prompt text and its weight; `is_break` marks a BREAK (text and weight unused)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


BREAK = Fragment("BREAK", 1.0, is_break=True)


@dataclass(frozen=True)
class LoraTag:
    """`<lora:NAME:SCALE>`: the LoRA file NAME (without its extension) at SCALE."""

    name: str
    scale: float = 1.0

    def __str__(self) -> str:
        return f"<lora:{self.name}:{self.scale:g}>"


def split_lora_tags(prompt: str) -> tuple[str, tuple[LoraTag, ...]]:
    """The prompt with its `<lora:…>` tags removed (the text around them kept, as the WebUI does),
    and the tags in order. Tags the WebUI has and vlrt does not apply are refused, not read as text."""
    tags: list[LoraTag] = []

    def take(match: re.Match[str]) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind != "lora":
            raise VlrtError(f"prompt tag {match.group(0)} is not supported: vlrt applies <lora:NAME:SCALE> tags only; remove it")
        name, scales = args[0].strip(), [a.strip() for a in args[1:]]
        scale = _number(scales[0]) if len(scales) == 1 else (1.0 if not scales else None)
        if not name or scale is None:
            raise VlrtError(
                f"prompt tag {match.group(0)} is not <lora:NAME> or <lora:NAME:SCALE> with one numeric scale "
                "(separate text-encoder and UNet scales are not supported): write it as <lora:NAME:0.8>"
            )
        if any(tag.name == name for tag in tags):
            raise VlrtError(f"prompt names <lora:{name}> twice: keep one tag per LoRA")
        tags.append(LoraTag(name, scale))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), tuple(tags)


def parse_prompt(prompt: str) -> list[Fragment]:
    """The prompt as weighted text pieces and BREAK markers, equal neighbours joined."""
    pieces: list[list] = []  # [text, weight, is_break], weights multiplied in place as brackets close
    round_open: list[int] = []
    square_open: list[int] = []
    text: list[str] = []

    def flush() -> None:
        if text:
            for i, part in enumerate(_BREAK.split("".join(text))):
                if i:
                    pieces.append(["", 1.0, True])
                pieces.append([part, 1.0, False])
            text.clear()

    def scale(start: int, multiplier: float) -> None:
        flush()
        for piece in pieces[start:]:
            piece[1] *= multiplier

    i, n = 0, len(prompt)
    while i < n:
        c = prompt[i]
        if c == "\\":
            if i + 1 < n and prompt[i + 1] in _ESCAPABLE:
                text.append(prompt[i + 1])
                i += 2
            else:
                i += 1
            continue
        if c in "([":
            flush()
            (round_open if c == "(" else square_open).append(len(pieces))
            i += 1
            continue
        if c == ":" and round_open:
            m = _WEIGHT.match(prompt, i)
            weight = _number(m.group(1)) if m else None
            if weight is not None:
                scale(round_open.pop(), weight)
                i = m.end()
                continue
        if c == ")" and round_open:
            scale(round_open.pop(), ROUND_MULTIPLIER)
            i += 1
            continue
        if c == "]" and square_open:
            scale(square_open.pop(), SQUARE_MULTIPLIER)
            i += 1
            continue
        text.append(c)
        i += 1
    flush()
    for start in reversed(round_open):
        scale(start, ROUND_MULTIPLIER)
    for start in reversed(square_open):
        scale(start, SQUARE_MULTIPLIER)
    return _join(pieces)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _join(pieces: list[list]) -> list[Fragment]:
    """Fragments with empty texts dropped and neighbours of equal weight joined; never empty."""
    out: list[Fragment] = []
    for text, weight, is_break in pieces:
        if is_break:
            out.append(BREAK)
        elif text:
            if out and not out[-1].is_break and out[-1].weight == weight:
                out[-1] = Fragment(out[-1].text + text, weight)
            else:
                out.append(Fragment(text, weight))
    return out or [Fragment("", 1.0)]


@dataclass
class Chunk:
    """Up to 75 token ids and their weights, before the start/end tokens and padding; `fixes` are
    the embeddings whose vectors replace the placeholder tokens from their offset on."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Vectors]] = field(default_factory=list)


# The token id an embedding's vectors stand on until they replace its token embeddings (the WebUI's).
PLACEHOLDER = 0
FindEmbedding = Callable[[list[int], int], "tuple[Vectors, int] | None"]


def chunk_prompt(
    fragments: Sequence[Fragment], tokenize: Callable[[str], list[int]], comma: int | None,
    find_embedding: FindEmbedding | None = None,
) -> list[Chunk]:
    """The fragments' tokens cut into chunks of at most 75, at BREAKs and (near the end) at commas;
    with `find_embedding` (`textual_inversion.EmbeddingMatcher`), an embedding's name becomes its
    vectors, one token each, all in one chunk."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk = Chunk()
        last_comma = -1

    for fragment in fragments:
        if fragment.is_break:
            close()
            continue
        tokens = tokenize(fragment.text) if fragment.text else []
        at = 0
        while at < len(tokens):
            token = tokens[at]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:], [(o - cut, v) for o, v in chunk.fixes if o >= cut])
                del chunk.tokens[cut:], chunk.weights[cut:]
                chunk.fixes = [(o, v) for o, v in chunk.fixes if o < cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK_TOKENS:
                close()
            found = find_embedding(tokens, at) if find_embedding is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(fragment.weight)
                at += 1
                continue
            vectors, name_tokens = found
            count = vectors.tensor.shape[0]
            if len(chunk.tokens) + count > CHUNK_TOKENS:
                close()
            chunk.fixes.append((len(chunk.tokens), vectors))
            chunk.tokens += [PLACEHOLDER] * count
            chunk.weights += [fragment.weight] * count
            at += name_tokens
    if chunk.tokens or not chunks:
        close()
    return chunks
