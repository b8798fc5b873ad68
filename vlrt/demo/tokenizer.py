"""A CLIP tokenizer built from a tiny local byte-level vocabulary.

Real CLIP vocabularies (49 408 tokens) come from a model hub; tests and the demo model need a
tokenizer that loads offline, tokenizes any text (non-ASCII included) and keeps the text
encoder's embedding table small. Every byte has a token, so no input ever falls outside it.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# A few common English pairs, so the BPE stage does real merging rather than being a no-op.
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("i", "n"),
    ("a", "n"),
    ("e", "r"),
    ("o", "n</w>"),
    ("in", "g</w>"),
    ("a", "t"),
    ("e", "n"),
    ("o", "r"),
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character, as CLIP's BPE expects."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and merges, in CLIP's order: bytes, bytes + `</w>`, merges, specials."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in _MERGES] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, list(_MERGES)


def vocab_size() -> int:
    """Number of tokens, which the text encoder's embedding table must match."""
    return len(byte_level_vocab()[0])


def write_byte_level_tokenizer(folder: Path) -> None:
    """Write vocab.json, merges.txt and the configs that `CLIPTokenizer.from_pretrained` reads offline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = byte_level_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
