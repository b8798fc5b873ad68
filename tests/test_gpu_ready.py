"""What a first GPU run would hit, shown on the CPU with stand-ins (issue 14, item 5).

TensorRT cannot be installed here, so a fake `tensorrt` module (and a fake `polygraphy`) is put
into `sys.modules`: it records what vlrt asks of it (loggers, builder flags, refits) and
behaves as the documented API does where the test needs it to.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import pytest
import torch

from vlrt.engines.base import UNET, VAE_DECODER, Engine
from vlrt.errors import VlrtError


class _Returns(Engine):
    """A stand-in engine whose output is a given tensor."""

    backend = "stand-in"

    def __init__(self, component: str, value: torch.Tensor, max_batch: int = 4) -> None:
        super().__init__(component, max_batch, torch.device("cpu"))
        self.value = value
        self.done = 0  # rows already returned: a split call continues where the last part ended

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = next(iter(feed.values())).shape[0]
        self.done += rows
        return {"image": self.value[self.done - rows : self.done]}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("rows", [2, 6])  # one call, and two calls of at most 4 rows
def test_a_non_finite_engine_output_is_a_clear_error_naming_the_component(bad, rows):
    value = torch.zeros(6, 3, 4, 4)
    value[rows - 1, 1, 2, 3] = bad
    engine = _Returns(VAE_DECODER, value)
    with pytest.raises(VlrtError) as err:
        engine(latent=torch.zeros(rows, 4, 2, 2))
    message = str(err.value)
    assert "\n" not in message
    assert "vae_decoder" in message and "NaN or infinite" in message and "--precision fp32" in message


def test_finite_outputs_pass_unchanged():
    value = torch.randn(6, 3, 4, 4)
    got = _Returns(VAE_DECODER, value)(latent=torch.zeros(6, 4, 2, 2))["image"]
    assert torch.equal(got, value)
