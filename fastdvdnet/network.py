"""The FastDVDnet network (Tassano et al., CVPR 2020), written from SPEC.md §7.1 and §10.

Module and attribute names follow the upstream checkpoint's keys (`temp1.inc.convblock.0.weight`,
…) so an upstream state dict loads with `load_state_dict` and no renaming. The two denoising
blocks are separate callables on purpose: the streaming denoiser runs stage 1 (`temp1`) once per
frame triplet and shares its output between three output frames (see `streaming.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlrt.errors import VlrtError

FRAMES_PER_BLOCK = 3
FRAMES_PER_WINDOW = 5
SIZE_MULTIPLE = 4  # two stride-2 downsamplings in each block


def _conv(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [_conv(cin, cout, stride, groups), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _Stack(nn.Module):
    """A sequence of layers kept under the attribute `convblock`, as the checkpoint keys expect."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.convblock = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.convblock(x)


def _double(ch: int) -> _Stack:
    return _Stack(*_conv_bn_relu(ch, ch), *_conv_bn_relu(ch, ch))


class DenoisingBlock(nn.Module):
    """One U-Net stage: three frames plus the noise map in, the middle frame denoised out."""

    def __init__(self) -> None:
        super().__init__()
        # The grouped conv sees [frame RGB, noise] per group, hence the interleaved input.
        self.inc = _Stack(*_conv_bn_relu(12, 90, groups=3), *_conv_bn_relu(90, 32))
        self.downc0 = _Stack(*_conv_bn_relu(32, 64, stride=2), _double(64))
        self.downc1 = _Stack(*_conv_bn_relu(64, 128, stride=2), _double(128))
        self.upc2 = _Stack(_double(128), _conv(128, 256), nn.PixelShuffle(2))
        self.upc1 = _Stack(_double(64), _conv(64, 128), nn.PixelShuffle(2))
        self.outc = _Stack(*_conv_bn_relu(32, 32), _conv(32, 3))

    def forward(self, frames: Tensor, noise_map: Tensor) -> Tensor:
        """frames [B,9,H,W] (three RGB frames), noise_map [B,1,H,W] -> [B,3,H,W]."""
        f0, f1, f2 = frames.chunk(FRAMES_PER_BLOCK, dim=1)
        x0 = self.inc(torch.cat((f0, noise_map, f1, noise_map, f2, noise_map), dim=1))
        x1 = self.downc0(x0)
        u2 = self.upc2(self.downc1(x1))
        u1 = self.upc1(x1 + u2)
        return f1 - self.outc(x0 + u1)


class FastDVDnet(nn.Module):
    """Two stages: the shared `temp1` on triplets (0,1,2), (1,2,3), (2,3,4), then `temp2`."""

    def __init__(self) -> None:
        super().__init__()
        self.temp1 = DenoisingBlock()
        self.temp2 = DenoisingBlock()

    def forward(self, frames: Tensor, noise_map: Tensor) -> Tensor:
        """frames [B,15,H,W] (five RGB frames t-2…t+2), noise_map [B,1,H,W] -> frame t [B,3,H,W]."""
        x = frames.chunk(FRAMES_PER_WINDOW, dim=1)
        b = frames.shape[0]
        # The three stage-1 triplets go through temp1 as one batch of 3B rows.
        triplets = torch.cat([torch.cat(x[i : i + 3], dim=1) for i in range(3)], dim=0)
        stage1 = self.temp1(triplets, noise_map.repeat(3, 1, 1, 1)).split(b, dim=0)
        return self.temp2(torch.cat(stage1, dim=1), noise_map)


def pad_to_multiple(x: Tensor) -> Tensor:
    """Reflect-pad the bottom/right of [..., H, W] up to a multiple of 4 (the upstream helper's rule)."""
    h, w = x.shape[-2:]
    ph, pw = -h % SIZE_MULTIPLE, -w % SIZE_MULTIPLE
    if ph >= h or pw >= w:
        raise VlrtError(f"FastDVDNet needs frames of at least 3x3 pixels, got {w}x{h}")
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect")


def denoise_padded(model: FastDVDnet, frames: Tensor, noise_map: Tensor) -> Tensor:
    """Run the whole network on any frame size: pad, run in eval mode, crop back, clamp to [0,1]."""
    h, w = frames.shape[-2:]
    model.eval()
    with torch.inference_mode():
        out = model(pad_to_multiple(frames), pad_to_multiple(noise_map))
    return out[..., :h, :w].clamp(0.0, 1.0)
