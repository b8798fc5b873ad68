"""One UNet (or ControlNet) engine per prompt length, for backends whose engines have a static prompt length.

ONNX and TensorRT UNets are exported with a static sequence axis (77 tokens, one chunk), since
TensorRT is several times faster with static shapes. A prompt longer than 75 tokens is several
chunks (77·k tokens), so its rows need an engine of that length: it is built (or found in the
engine cache) the first time such rows come, and kept. The executor groups UNet rows by their
embedding shape, so every call has one length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from vlrt.engines.base import Engine


class TokenLengthEngine(Engine):
    """Dispatches each UNet call to the engine of its prompt length, making missing ones with `make`."""

    def __init__(self, engines: dict[int, Engine], make: Callable[[int], Engine]) -> None:
        first = next(iter(engines.values()))
        super().__init__(first.component, first.max_batch, first.device, (first.input_names, first.output_names))
        self.backend = first.backend
        self.engines = engines
        self.make = make

    @property
    def path(self) -> Path | None:
        """The file of the engine it started with (one chunk, unless made otherwise)."""
        return getattr(next(iter(self.engines.values())), "path", None)

    def engine_for(self, tokens: int) -> Engine:
        """The engine for prompts of `tokens` tokens, built on first use."""
        if tokens not in self.engines:
            self.engines[tokens] = self.make(tokens)
        return self.engines[tokens]

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.engine_for(int(feed["encoder_hidden_states"].shape[1]))._run(feed)
