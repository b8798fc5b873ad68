"""Textual-inversion embeddings from the WebUI's `embeddings/` folder (`--embeddings-dir`).

What the WebUI does, from its documented behaviour (wiki: "Extra networks", "Textual Inversion"),
and what vlrt does the same way:

- Every `.pt`, `.bin` and `.safetensors` file in the folder and its subfolders is an embedding
  named by its file name without the extension. Formats: the WebUI's `.pt` (`string_to_param`),
  diffusers' `.bin`/`.safetensors` (one token → its vectors), `emb_params` (`.safetensors` of
  the WebUI and kohya), and SDXL's pair of `clip_l` and `clip_g` vectors. `.pt` and `.bin` are
  read with `torch.load(weights_only=True)`: a file that holds code is refused, never run.
- A prompt names an embedding by writing its name: the name is tokenized with the model's
  tokenizer and matched against the prompt's tokens (`prompt_syntax.chunk_prompt`), so case does
  not matter (CLIP lower-cases), a name matches a whole word (or a word's last pieces, where the
  tokenizer splits the word that way), within one piece of equal emphasis, and of names that
  match at one place the longest wins. A word that names no file stays text.
- Its vectors take its place: each counts as one token of the 75 of a chunk, they are never cut
  between chunks (a chunk that cannot hold them all ends early), and emphasis weights them like
  the words around them.

On SDXL, CLIP-L takes a file's `clip_l` vectors and OpenCLIP-G its `clip_g` vectors (`slot`).

Where vlrt differs: a name used by a prompt whose file cannot be read, is of another width than
the text encoder's (or for another family: a one-encoder file on SDXL, an SDXL pair on SD 1.x/2.x),
holds more than 75 vectors (an SDXL pair: as many `clip_l` as `clip_g` ones), or is the name of two
files, is an error naming the file (the WebUI skips such files and leaves the name as text); files
no prompt names are never a problem. Every file is read once, when the model loads, and its sha256 is taken from the same
bytes, so what the settings file records is what was used.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vlrt.errors import VlrtError

EXTENSIONS = (".pt", ".bin", ".safetensors")
ONE_ENCODER = ""  # the key of a one-encoder file's vectors
CLIP_L, CLIP_G = "clip_l", "clip_g"  # the keys of SDXL's pair: its CLIP-L's and its OpenCLIP-G's vectors
MAX_VECTORS = 75


@dataclass(frozen=True)
class EmbeddingFile:
    """One file of the folder: its vectors by text encoder, or why it cannot be used."""

    name: str
    path: Path
    sha256: str
    vectors: dict[str, torch.Tensor]
    problem: str = ""


@dataclass(frozen=True)
class Vectors:
    """An embedding as one text encoder takes it: [n, width]."""

    name: str
    sha256: str
    tensor: torch.Tensor


def read_folder(folder: str | Path) -> list[EmbeddingFile]:
    """Every embedding file under `folder`, in path order; a missing folder is an error."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise VlrtError(f"embeddings_dir {folder} is not a folder: give the WebUI's embeddings/ folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    return [_read_file(p) for p in paths]


def embedding_records(files: list[EmbeddingFile]) -> list[dict[str, str]]:
    """What the settings file records of each file: name, path and sha256."""
    return [{"name": f.name, "path": str(f.path), "sha256": f.sha256} for f in files]


def _read_file(path: Path) -> EmbeddingFile:
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    try:
        return EmbeddingFile(path.stem, path, sha, _vectors(_load(path, data)))
    except Exception as exc:  # kept for the prompt that names it: an unused bad file is no error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return EmbeddingFile(path.stem, path, sha, {}, first)


def _load(path: Path, data: bytes) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load

        return load(data)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise ValueError("it holds more than tensors (code is never run), so it is not read") from None
        raise


def _vectors(data: object) -> dict[str, torch.Tensor]:
    """The vectors of a file's contents by text encoder, as the WebUI tells its formats apart."""
    if not isinstance(data, dict):
        raise ValueError(f"it holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError("its string_to_param does not hold exactly one tensor")
        found = {ONE_ENCODER: next(iter(params.values()))}
    elif CLIP_L in data and CLIP_G in data:
        found = {CLIP_L: data[CLIP_L], CLIP_G: data[CLIP_G]}
    elif "emb_params" in data:
        found = {ONE_ENCODER: data["emb_params"]}
    elif len(data) == 1:
        found = {ONE_ENCODER: next(iter(data.values()))}
    else:
        raise ValueError(f"its keys {sorted(map(str, data))[:4]} are none of the embedding formats")
    for key, value in found.items():
        if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or not value.is_floating_point():
            raise ValueError("its vectors are not a 1- or 2-dimensional float tensor")
        found[key] = value.detach().float().reshape(-1, value.shape[-1])
    if len({value.shape[0] for value in found.values()}) > 1:
        raise ValueError("its clip_l and clip_g hold different numbers of vectors")
    return found


class EmbeddingMatcher:
    """A folder's embeddings as one tokenizer sees their names, for one text encoder (`slot`)."""

    def __init__(
        self, files: list[EmbeddingFile], tokenize: Callable[[str], list[int]], width: int, slot: str = ONE_ENCODER
    ) -> None:
        self.width, self.slot = width, slot
        by_ids: dict[tuple[int, ...], list[EmbeddingFile]] = {}
        for f in files:
            ids = tuple(tokenize(f.name))
            if ids:
                by_ids.setdefault(ids, []).append(f)
        self._by_first: dict[int, list[tuple[tuple[int, ...], list[EmbeddingFile]]]] = {}
        for ids, same in sorted(by_ids.items(), key=lambda item: -len(item[0])):
            self._by_first.setdefault(ids[0], []).append((ids, same))

    def __call__(self, tokens: list[int], at: int) -> tuple[Vectors, int] | None:
        """The embedding whose name's tokens start at `tokens[at]` (the longest), and how many tokens
        of the prompt its name takes; None where none does."""
        for ids, same in self._by_first.get(tokens[at], ()):
            if tuple(tokens[at : at + len(ids)]) == ids:
                return self._checked(same), len(ids)
        return None

    def _checked(self, same: list[EmbeddingFile]) -> Vectors:
        if len(same) > 1:
            raise VlrtError(
                f"the prompt names embedding {same[0].name}, which is the name of {len(same)} files "
                f"({', '.join(str(f.path) for f in same)}): rename or move all but one"
            )
        f = same[0]
        if f.problem:
            raise VlrtError(f"embedding {f.name} ({f.path}) could not be read: {f.problem}; replace the file or leave {f.name} out of the prompt")
        vectors = f.vectors.get(self.slot)
        if vectors is None:
            kind = "an SDXL embedding (clip_l and clip_g)" if CLIP_G in f.vectors else "for a one-encoder model (SD 1.x/2.x)"
            raise VlrtError(f"embedding {f.name} ({f.path}) is {kind}, not for this model: use one made for it")
        if vectors.shape[-1] != self.width:
            raise VlrtError(
                f"embedding {f.name} ({f.path}) has vectors {vectors.shape[-1]} wide, but this model's text encoder takes "
                f"{self.width} (768: SD 1.x, 1024: SD 2.x; SDXL's clip_l 768 and clip_g 1280): use an embedding made for this model, or leave {f.name} out of the prompt"
            )
        if vectors.shape[0] > MAX_VECTORS:
            raise VlrtError(f"embedding {f.name} ({f.path}) has {vectors.shape[0]} vectors, more than a chunk's {MAX_VECTORS}")
        return Vectors(f.name, f.sha256, vectors)
