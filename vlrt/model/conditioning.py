"""A prompt pair's conditioning of the UNet: the per-row inputs the executor feeds besides sample and timestep.

SD 1.x/2.x: the text embeddings alone (`encoder_hidden_states`).

SDXL, as diffusers' `StableDiffusionXLImg2ImgPipeline` and the WebUI compute it:
- `encoder_hidden_states`: both text encoders' token embeddings, CLIP-L's (768 wide) and
  OpenCLIP-G's (1280), concatenated per token (2048). Each encoder reads the prompt with the WebUI's
  syntax on its own (emphasis, BREAK, 75-token chunks, the chunk means restored per encoder), as the
  WebUI wraps each of SDXL's two embedders.
- Their layer: the penultimate one, without the final layer norm, as SDXL was trained. CLIP skip
  N ≥ 2 takes CLIP-L's hidden state N layers from the end instead, as the WebUI does with its
  "Clip skip SDXL" option (`sdxl_clip_l_skip`) on; OpenCLIP-G always gives its penultimate layer.
  So clip skip 1 (the default, where the WebUI ignores clip skip on SDXL) and 2 are the same.
- `text_embeds`: OpenCLIP-G's pooled, projected embedding of the prompt's first chunk (the WebUI's).
- `time_ids`: (original height, width, crop top, left, target height, width) = (H, W, 0, 0, H, W)
  for an H×W render: the WebUI's defaults (original and target size = the render size, crop
  `sdxl_crop_top/left` = 0), which are also diffusers' for an H×W image.
- An empty negative prompt ("" exactly) gives zeros in place of its text embeddings and pooled
  embedding, with its time ids kept: the WebUI has done so on SDXL since 1.6
  (`force_zero_negative_prompt`), and it is what diffusers does for `negative_prompt=None` with
  `force_zeros_for_empty_prompt` (SDXL base's setting). Only the negative's own first chunk is zero
  when the prompt pads it to a longer length (the padding chunks are the encoded empty prompt, as
  for every negative prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlrt.model.prompt_embeddings import CHUNK_LENGTH, PromptEncoder

Conditioning = dict[str, torch.Tensor]  # input name -> one row ([1, …])

HIDDEN = "encoder_hidden_states"
TEXT_EMBEDS = "text_embeds"
TIME_IDS = "time_ids"


def time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's size conditioning [1, 6] of an height×width render (original = target = render size, no crop)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def conditioning_pair(
    encoders: Sequence[PromptEncoder], prompt: str, negative: str, size: tuple[int, int]
) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) of one job at render `size` (height, width): one encoder for SD 1.x/2.x,
    SDXL's two (CLIP-L, OpenCLIP-G) for SDXL, whose pooled embedding and sizes are added."""
    pairs = [encoder.pair(prompt, negative) for encoder in encoders]
    cond = {HIDDEN: torch.cat([c for c, _ in pairs], dim=-1)}
    uncond = {HIDDEN: torch.cat([u for _, u in pairs], dim=-1)}
    if len(encoders) == 1:
        return cond, uncond
    pooled = encoders[-1]
    cond[TEXT_EMBEDS], uncond[TEXT_EMBEDS] = pooled.pooled(prompt), pooled.pooled(negative)
    if negative == "":
        hidden = uncond[HIDDEN].clone()
        hidden[:, :CHUNK_LENGTH] = 0.0
        uncond = {HIDDEN: hidden, TEXT_EMBEDS: torch.zeros_like(uncond[TEXT_EMBEDS])}
    cond[TIME_IDS] = uncond[TIME_IDS] = time_ids(*size)
    return cond, uncond
