"""Text embeddings of WebUI-syntax texts with one text encoder: chunked, weighted, CLIP skip, cached.

What the WebUI does, from its documented behaviour:
- Every 75-token chunk (`prompt_syntax.chunk_prompt`) becomes start token + tokens + end token,
  padded to 77 with the tokenizer's pad token (SD 1.x pads with the end token, SD 2.x with `!`),
  and goes through the text encoder on its own; the chunks' embeddings are concatenated, so a
  prompt of k chunks gives [1, 77·k, D].
- CLIP skip N (1 = the last layer): for N > 1 the hidden state N layers from the end (2 = the
  penultimate layer's output) followed by the encoder's final layer norm. diffusers' own
  `clip_skip` argument counts one less. SDXL's encoders take their layer without the final
  layer norm (`final_norm=False`), as SDXL was trained.
- An encoder with a projection (SDXL's second, OpenCLIP-G) also gives a pooled embedding: that of
  the prompt's first chunk, unweighted, as the WebUI takes it (`pooled`).
- Weights multiply each token's embedding; the chunk is then rescaled so that the mean of all
  its values is what it was before weighting (z *= w; z *= mean_before / mean_after).
- A textual-inversion embedding's vectors replace the token embeddings of its placeholders, before
  the position embeddings are added, as diffusers' `load_textual_inversion` makes them do; an
  encoder takes the vectors of its `slot` (SDXL's `clip_l` and `clip_g`).

Prompt editing, the prompt/negative padding and SDXL's added inputs are `conditioning`'s. A prompt
of plain text (no syntax, at most 75 tokens) gives exactly what diffusers' pipeline computes, which
the exactness tests against diffusers rely on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vlrt.errors import VlrtError
from vlrt.model.prompt_syntax import Chunk, chunk_prompt, parse_prompt
from vlrt.model.textual_inversion import ONE_ENCODER, EmbeddingFile, EmbeddingMatcher, Vectors

CHUNK_LENGTH = 77  # 75 tokens + start + end: CLIP's context


class PromptEncoder:
    """Embeds texts with one model's tokenizer and text encoder; one result per distinct text."""

    def __init__(
        self, tokenizer: Any, text_encoder: torch.nn.Module, device: torch.device, clip_skip: int = 1,
        final_norm: bool = True, embeddings: list[EmbeddingFile] = (), slot: str = ONE_ENCODER,
    ) -> None:
        """`embeddings`: the textual-inversion files prompts may name (`textual_inversion.read_folder`),
        of which this encoder takes the vectors under `slot`."""
        layers = int(text_encoder.config.num_hidden_layers)
        if not 1 <= clip_skip <= layers:
            raise VlrtError(f"clip_skip {clip_skip} is out of range: this text encoder has {layers} layers (use 1 to {layers})")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.clip_skip = clip_skip
        self.final_norm = final_norm
        # Keyed on the text and the sha256 of the embedding files it names: a text means other vectors with other files.
        self._cache: dict[tuple[str, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor | None]] = {}
        commas = tokenizer(",", add_special_tokens=False).input_ids
        self.comma = commas[0] if len(commas) == 1 else None
        self.use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        width = text_encoder.get_input_embeddings().embedding_dim
        self.embeddings = EmbeddingMatcher(list(embeddings), self._tokenize, width, slot) if embeddings else None

    def __call__(self, text: str) -> torch.Tensor:
        """Embeddings [1, 77·chunks, D] of one text (no prompt editing left in it), computed once."""
        return self._cached(text)[0]

    def pooled(self, text: str) -> torch.Tensor:
        """The projected pooled embedding [1, P] of the text's first chunk (encoders with a projection only)."""
        pooled = self._cached(text)[1]
        if pooled is None:
            raise ValueError(f"{type(self.text_encoder).__name__} has no projection, so no pooled embedding")
        return pooled

    def _cached(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        chunks = self.chunks(text)
        key = (text, tuple(v.sha256 for chunk in chunks for _, v in chunk.fixes))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._encode(chunks)
        return cached

    def chunks(self, text: str) -> list[Chunk]:
        """The text's token chunks (before start/end tokens and padding), embeddings' vectors in place."""
        return chunk_prompt(parse_prompt(text), self._tokenize, self.comma, self.embeddings)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, truncation=False).input_ids)

    @torch.inference_mode()
    def _encode(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        bos, eos, pad = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ids, weights, masks = [], [], []
        for chunk in chunks:
            fill = CHUNK_LENGTH - 2 - len(chunk.tokens)
            ids.append([bos, *chunk.tokens, eos] + [pad] * fill)
            weights.append([1.0, *chunk.weights, 1.0] + [1.0] * fill)
            masks.append([1] * (CHUNK_LENGTH - fill) + [0] * fill)
        mask = torch.tensor(masks, device=self.device) if self.use_mask else None
        with _token_vectors(self.text_encoder, [chunk.fixes for chunk in chunks]):
            z, pooled = self._hidden(torch.tensor(ids, device=self.device), mask)
        z = z.float()
        w = torch.tensor(weights, dtype=torch.float32, device=z.device)
        if not bool((w == 1.0).all()):
            z = torch.stack([_weighted(zc, wc) for zc, wc in zip(z, w)])
        return z.reshape(1, -1, z.shape[-1]).cpu(), None if pooled is None else pooled[:1].float().cpu()

    def _hidden(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text encoder's output for each chunk, `clip_skip` layers from the end, and its pooled
        projection per chunk where it has one."""
        out = self.text_encoder(input_ids, attention_mask=mask, output_hidden_states=True)
        pooled = getattr(out, "text_embeds", None)
        if self.clip_skip == 1 and self.final_norm:
            return out.last_hidden_state, pooled
        hidden = out.hidden_states[-self.clip_skip]
        if not self.final_norm:
            return hidden, pooled
        final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_norm(hidden), pooled


@contextmanager
def _token_vectors(text_encoder: torch.nn.Module, fixes: list[list[tuple[int, Vectors]]]) -> Iterator[None]:
    """While encoding, row b's token embeddings from position 1 + offset (after the start token) are
    the vectors of the embeddings in `fixes[b]`."""
    if not any(fixes):
        yield
        return

    def replace(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for row, row_fixes in enumerate(fixes):
            for offset, vectors in row_fixes:
                out[row, 1 + offset : 1 + offset + vectors.tensor.shape[0]] = vectors.tensor.to(out)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def _weighted(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One chunk's embeddings [77, D] scaled per token, then restored to the chunk's original mean."""
    before = z.mean()
    z = z * weights[:, None]
    return z * (before / z.mean())
