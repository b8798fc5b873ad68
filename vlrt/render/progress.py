"""Progress and messages on standard error, quiet when it is not a terminal or with --quiet."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """One bar for finished output frames; its postfix shows how far each loop pass (or each
    segment, with `parts_label` "S") has got."""

    def __init__(self, total: int | None, passes: int, quiet: bool = False, parts_label: str = "L") -> None:
        self.quiet = quiet
        self.parts_label = parts_label
        self.enabled = not quiet and sys.stderr.isatty()
        self.started = time.perf_counter()
        self.passes = passes
        self.bar = tqdm(total=total, unit="frame", desc="render", disable=not self.enabled, file=sys.stderr, dynamic_ncols=True)

    def set_total(self, total: int | None) -> None:
        self.bar.total = total
        self.started = time.perf_counter()

    def update(self, done: int, per_pass: list[int]) -> None:
        if not self.enabled:
            return
        self.bar.n = done
        if self.passes:
            self.bar.set_postfix_str(" ".join(f"{self.parts_label}{i + 1}:{n}" for i, n in enumerate(per_pass)), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def log(self, message: str) -> None:
        """A line for the user (not shown with --quiet)."""
        if not self.quiet:
            if self.enabled:
                self.bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started
