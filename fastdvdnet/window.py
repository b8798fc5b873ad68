"""The 5-frame sliding-window rule of FastDVDnet sequence inference (SPEC.md §2.12 step 5)."""

from __future__ import annotations

RADIUS = 2


def mirror_index(k: int, n: int) -> int:
    """Fold any integer index k onto [0, n) by mirror reflection that does not repeat the edge.

    Reflection is applied repeatedly (period 2(n-1)), so it is defined for every k and every
    n >= 1: for n >= 3 and k in [-2, n+1] it is the single reflection of the upstream script
    (-k before the start, 2(n-1)-k past the end); for n = 2 indices alternate 0,1,0,1…; for n = 1
    every index is 0.
    """
    if n < 1:
        raise ValueError(f"a clip needs at least one frame, got n={n}")
    if n == 1:
        return 0
    period = 2 * (n - 1)
    k %= period
    return k if k < n else period - k


def window_indices(f: int, n: int) -> tuple[int, int, int, int, int]:
    """Frame indices of the window centred on frame f of an n-frame clip.

    Frame 0 gives (2,1,0,1,2), the last gives (n-3,n-2,n-1,n-2,n-3). The upstream script fails for
    n < 3; here short clips reflect repeatedly (see `mirror_index`): n = 2 gives (0,1,0,1,0) for
    frame 0 and (1,0,1,0,1) for frame 1, and n = 1 gives (0,0,0,0,0).
    """
    if not 0 <= f < n:
        raise ValueError(f"frame {f} is outside a clip of {n} frames")
    a, b, c, d, e = (mirror_index(k, n) for k in range(f - RADIUS, f + RADIUS + 1))
    return a, b, c, d, e
