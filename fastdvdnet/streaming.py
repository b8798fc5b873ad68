"""Streaming FastDVDnet with stage-1 reuse: O(1) memory in the clip length, ~2 block calls a frame.

Why: the upstream script stacks the whole clip on the GPU and runs the full network per frame,
i.e. three `temp1` calls and one `temp2` call per output frame. But output frame f is
`temp2(S(f-1), S(f), S(f+1))` where `S(j) = temp1(r(j-1), r(j), r(j+1))`, `r = mirror_index`
(window.py) and j is a *virtual* index in [-1, n]: the window of frame f is r(f-2)…r(f+2), and
its three triplets are exactly those centred on f-1, f and f+1. Each S(j) is computed once and
shared by the (up to) three outputs that use it, so an n-frame clip costs n+2 `temp1` rows and
n `temp2` rows instead of 3n + n. The result is the plain network's, row for row.

Design:
- Frames arrive one at a time (`push`); the clip length n is known only at `close`. A virtual
  index k is *resolved* once its real frame is fixed whatever n turns out to be: 0 <= k < c
  (c = frames received so far) maps to k, and -c < k < 0 maps to -k (the start reflection is
  already valid since n >= c). Indices at or past c stay unresolved until `close`, because the
  end reflection depends on n. The start edge thus needs frames 0..2 before S(-1) exists and the
  end edge S(n-1), S(n) (which reuse frames n-3..n-1) is computed at `close`; for n < 3 every
  S(j) waits for `close`, since then r depends on n everywhere (window.py's n < 3 rule).
- S(j) are computed in increasing j, outputs in increasing f; an output is ready once S(f+1)
  exists. Both stages queue their ready rows and run a batch through the injected
  `block1`/`block2` only when `max_batch` rows are waiting (or at `close`, which flushes), so
  the caller controls batching and the numbers do not depend on it: every row is computed
  from the same inputs whatever the batch it lands in.
- Frames are reflect-padded to a multiple of 4 on arrival (as the plain path pads its 15-channel
  stack) and outputs are cropped and clamped to [0,1] on the way out. Stage-1 outputs are kept
  padded and unclamped, exactly as inside the network.
- Memory: frames with index >= min(next S - 1, c - 3) (the last three are always kept for the
  end reflection) and S(j) for j >= next output - 1: at most about max_batch + 3 of each.

The pushed frames are the network input: adding the extension's synthetic noise (SPEC.md §2.12
step 3) and blending with the original are the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vlrt.errors import VlrtError

from .network import pad_to_multiple
from .window import mirror_index

BlockFn = Callable[[Tensor, Tensor], Tensor]
"""(frames [B,9,H,W], noise_map [B,1,H,W]) -> [B,3,H,W]; H and W already multiples of 4."""


class StreamingDenoiser:
    """Feed frames with `push`, end with `close`; both return the denoised frames now ready, in order.

    `block1`/`block2` run FastDVDnet's `temp1`/`temp2` (the torch modules, or engines), `sigma`
    is the noise level on the [0,1] scale (σ/255), and `max_batch` the most rows per call.
    """

    def __init__(self, block1: BlockFn, block2: BlockFn, sigma: float, max_batch: int = 1) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._block1, self._block2 = block1, block2
        self._sigma = float(sigma)
        self._max_batch = max_batch
        self._frames: dict[int, Tensor] = {}  # padded input frames by real index
        self._stage1: dict[int, Tensor] = {}  # S(j), padded, by virtual index
        self._count = 0  # frames received
        self._total: int | None = None  # n, known at close
        self._next_s1 = -1  # next virtual index j whose S(j) is not computed
        self._next_out = 0  # next output frame
        self._size: tuple[int, int] | None = None
        self._noise: Tensor | None = None  # [1,1,Hp,Wp]

    def push(self, frame: Tensor) -> list[Tensor]:
        """Add the next frame (float [3,H,W] in [0,1]); return the outputs completed by it."""
        if self._total is not None:
            raise RuntimeError("push after close")
        self._accept(frame)
        self._frames[self._count] = pad_to_multiple(frame.unsqueeze(0))[0]
        self._count += 1
        return self._drain(flush=False)

    def close(self) -> list[Tensor]:
        """Declare the end of the clip and return every remaining output."""
        if self._total is None:
            self._total = self._count
        out = self._drain(flush=True) if self._count else []
        self._frames.clear()
        self._stage1.clear()
        return out

    def _accept(self, frame: Tensor) -> None:
        if frame.dim() != 3 or frame.shape[0] != 3:
            raise VlrtError(f"FastDVDNet takes RGB frames [3,H,W], got shape {tuple(frame.shape)}")
        size = (int(frame.shape[1]), int(frame.shape[2]))
        if self._size is None:
            self._size = size
            padded = pad_to_multiple(frame.new_zeros((1, 1) + size))
            self._noise = torch.full_like(padded, self._sigma)
        elif size != self._size:
            raise VlrtError(
                f"FastDVDNet needs frames of one size: frame {self._count} is "
                f"{size[1]}x{size[0]}, the first was {self._size[1]}x{self._size[0]}"
            )

    def _resolve(self, k: int) -> int | None:
        """The real frame behind virtual index k, or None while it depends on the unknown end."""
        if self._total is not None:
            return mirror_index(k, self._total)
        if 0 <= k < self._count:
            return k
        if -self._count < k < 0:
            return -k
        return None

    def _ready_stage1(self) -> list[int]:
        last = self._total if self._total is not None else self._count - 2
        ready = []
        for j in range(self._next_s1, last + 1):
            if any(self._resolve(k) is None for k in (j - 1, j, j + 1)):
                break
            ready.append(j)
        return ready

    def _ready_outputs(self) -> list[int]:
        last = self._next_s1 - 2  # output f needs S(f+1)
        if self._total is not None:
            last = min(last, self._total - 1)
        return list(range(self._next_out, last + 1))

    def _drain(self, flush: bool) -> list[Tensor]:
        done: list[Tensor] = []
        while True:
            js = self._ready_stage1()
            fs = self._ready_outputs()
            # Full stage-2 batches first (they free memory); at a flush, stage 1 runs dry
            # before a partial stage-2 batch so the last outputs share as few calls as possible.
            if len(fs) >= self._max_batch or (flush and fs and not js):
                done.extend(self._run_stage2(fs[: self._max_batch]))
            elif js and (flush or len(js) >= self._max_batch):
                self._run_stage1(js[: self._max_batch])
            else:
                return done

    def _run(self, block: BlockFn, rows: list[Tensor]) -> Tensor:
        assert self._noise is not None
        batch = torch.stack(rows)
        with torch.inference_mode():
            return block(batch, self._noise.expand(len(rows), -1, -1, -1).contiguous())

    def _run_stage1(self, js: list[int]) -> None:
        rows = []
        for j in js:
            idx = [self._resolve(k) for k in (j - 1, j, j + 1)]
            rows.append(torch.cat([self._frames[i] for i in idx]))
        for j, s in zip(js, self._run(self._block1, rows).unbind(0)):
            self._stage1[j] = s
        self._next_s1 = js[-1] + 1
        keep_from = min(self._next_s1 - 1, self._count - 3)
        for i in [i for i in self._frames if i < keep_from]:
            del self._frames[i]

    def _run_stage2(self, fs: list[int]) -> list[Tensor]:
        assert self._size is not None
        h, w = self._size
        rows = [torch.cat([self._stage1[j] for j in (f - 1, f, f + 1)]) for f in fs]
        out = self._run(self._block2, rows)[..., :h, :w].clamp(0.0, 1.0)
        self._next_out = fs[-1] + 1
        for j in [j for j in self._stage1 if j < self._next_out - 1]:
            del self._stage1[j]
        return list(out.unbind(0))
