"""A prompt pair's conditioning of the UNet: the per-row inputs the executor feeds besides sample and
timestep, for every sampling step.

SD 1.x/2.x: the text embeddings alone (`encoder_hidden_states`).

SDXL, as diffusers' `StableDiffusionXLImg2ImgPipeline` and the WebUI compute it:
- `encoder_hidden_states`: both text encoders' token embeddings, CLIP-L's (768 wide) and
  OpenCLIP-G's (1280), concatenated per token (2048). Each encoder reads the prompt with the WebUI's
  syntax on its own (emphasis, BREAK, 75-token chunks, the chunk means restored per encoder), as the
  WebUI wraps each of SDXL's two embedders; a textual-inversion embedding gives CLIP-L its `clip_l`
  vectors and OpenCLIP-G its `clip_g` vectors.
- Their layer: the penultimate one, without the final layer norm, as SDXL was trained. CLIP skip
  N ≥ 2 takes CLIP-L's hidden state N layers from the end instead, as the WebUI does with its
  "Clip skip SDXL" option (`sdxl_clip_l_skip`) on; OpenCLIP-G always gives its penultimate layer.
  So clip skip 1 (the default, where the WebUI ignores clip skip on SDXL) and 2 are the same.
- `text_embeds`: OpenCLIP-G's pooled, projected embedding of the text's first chunk (the WebUI's).
- `time_ids`: (original height, width, crop top, left, target height, width) = (H, W, 0, 0, H, W)
  for an H×W render: the WebUI's defaults (original and target size = the render size, crop
  `sdxl_crop_top/left` = 0), which are also diffusers' for an H×W image.
- An empty negative prompt ("" exactly) gives zeros in place of its text embeddings and pooled
  embedding, with its time ids kept: the WebUI has done so on SDXL since 1.6
  (`force_zero_negative_prompt`), and it is what diffusers does for `negative_prompt=None` with
  `force_zeros_for_empty_prompt` (SDXL base's setting). Only the negative's own first chunk is zero
  when the prompt pads it to a longer length (the padding chunks are the encoded empty prompt, as
  for every negative prompt).

Over the steps: prompt editing and alternation (`prompt_schedule`) give a prompt several texts; each
is encoded (SDXL: with its own pooled embedding), and all texts of a job's prompt and negative
prompt are padded with the empty prompt's chunks to one length (the WebUI's "pad prompt/negative
prompt to be same length"), so a job's UNet rows keep their shapes from step to step (and batch
with other jobs'). The WebUI's default since 1.6 evaluates prompt and negative at their own lengths
instead; with padding the shorter one attends to a few more empty tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlrt.model.prompt_embeddings import CHUNK_LENGTH, PromptEncoder
from vlrt.model.prompt_schedule import entry_at, prompt_schedule, refuse_composition

Conditioning = dict[str, torch.Tensor]  # input name -> one row ([1, …])

HIDDEN = "encoder_hidden_states"
TEXT_EMBEDS = "text_embeds"
TIME_IDS = "time_ids"


@dataclass(frozen=True)
class StepEmbeddings:
    """A prompt's conditioning over the sampling steps: `entries[i]` serves step k (0-based, from a
    job's first step) up to `ends[i]` (`prompt_schedule`'s rule); every entry has the same inputs and shapes."""

    ends: tuple[int, ...]
    entries: tuple[Conditioning, ...]

    def at(self, k: int) -> Conditioning:
        return self.entries[entry_at(self.ends, k)]

    @property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Each input's name and shape, the same at every step."""
        return tuple((name, tuple(value.shape)) for name, value in self.entries[0].items())


def time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's size conditioning [1, 6] of an height×width render (original = target = render size, no crop)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def text_embeddings(encoders: Sequence[PromptEncoder], text: str) -> torch.Tensor:
    """Embeddings [1, 77·chunks, D] of one text: the encoders' side by side (SDXL: CLIP-L's, then
    OpenCLIP-G's); one encoder's cached tensor itself."""
    found = [encoder(text) for encoder in encoders]
    return found[0] if len(found) == 1 else torch.cat(found, dim=-1)


def conditioning_pair(
    encoders: Sequence[PromptEncoder], prompt: str, negative: str, steps: int, size: tuple[int, int]
) -> tuple[StepEmbeddings, StepEmbeddings]:
    """(cond, uncond) of one job over a schedule of `steps` steps at render `size` (height, width): one
    encoder for SD 1.x/2.x, SDXL's two (CLIP-L, OpenCLIP-G) for SDXL, whose pooled embedding and sizes
    are added. Every text is padded with empty-prompt chunks to the longest one's length."""
    refuse_composition(prompt)
    schedules = [prompt_schedule(prompt, steps), prompt_schedule(negative, steps)]
    encoded = {text: text_embeddings(encoders, text) for schedule in schedules for _, text in schedule}
    longest = max(z.shape[1] for z in encoded.values())
    empty = text_embeddings(encoders, "")
    sizes = time_ids(*size)

    def entry(text: str, zero: bool) -> Conditioning:
        z = encoded[text]
        missing = (longest - z.shape[1]) // CHUNK_LENGTH
        z = torch.cat([z, empty.repeat(1, missing, 1)], dim=1) if missing else z
        if len(encoders) == 1:
            return {HIDDEN: z}
        pooled = encoders[-1].pooled(text)
        if zero:
            z = z.clone()
            z[:, :CHUNK_LENGTH] = 0.0
            pooled = torch.zeros_like(pooled)
        return {HIDDEN: z, TEXT_EMBEDS: pooled, TIME_IDS: sizes}

    cond, uncond = (
        StepEmbeddings(tuple(end for end, _ in schedule), tuple(entry(text, side == 1 and negative == "") for _, text in schedule))
        for side, schedule in enumerate(schedules)
    )
    return cond, uncond
