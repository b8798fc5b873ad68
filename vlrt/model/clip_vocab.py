"""CLIP's tokenizer for single-file checkpoints, from a vocabulary an installed package ships.

A single-file checkpoint holds no tokenizer, and vlrt never downloads one. The BPE vocabulary
that SD 1.x (OpenAI CLIP) and SD 2.x (OpenCLIP) were trained with, `bpe_simple_vocab_16e6.txt.gz`,
ships inside the `open_clip_torch` package (MIT licence, maintained by the OpenCLIP authors). It
is read from the installed package's files without importing the package, whose imports need
torchvision; `make setup` installs it with `pip install --no-deps open_clip_torch`, so that its
dependencies (torchvision, timm) are not pulled in either.

The vocabulary file lists merges; the token table is CLIP's: the 256 byte characters, the same
with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>` (49 408 tokens).
"""

from __future__ import annotations

import gzip
import importlib.metadata
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from vlrt.demo.tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, bytes_to_unicode
from vlrt.errors import VlrtError

PACKAGE = "open_clip_torch"
VOCAB_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # CLIP uses the first 48 894 merges of the file
INSTALL = f"pip install --no-deps {PACKAGE}"
SD2_PAD = "!"  # OpenCLIP (SD 2.x, SDXL's second encoder) pads prompts with "!" (token 0); CLIP with the end token


def vocab_path() -> Path:
    """The vocabulary file inside the installed open_clip_torch, without importing it."""
    try:
        path = Path(importlib.metadata.distribution(PACKAGE).locate_file(VOCAB_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise VlrtError(
            f"single-file checkpoints need CLIP's vocabulary, which vlrt reads from the package {PACKAGE}: `{INSTALL}`"
        ) from None
    if not path.is_file():
        raise VlrtError(f"{PACKAGE} is installed but has no {VOCAB_FILE}: reinstall it with `{INSTALL}`")
    return path


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(vocab_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """CLIP's tokenizer (49 408 tokens, 77 per prompt chunk), padding with `pad_token`."""
    vocab, merges = _vocabulary()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH
    )
