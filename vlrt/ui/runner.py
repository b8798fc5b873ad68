"""`vlrt` commands run as child processes, exactly as a user would type them.

A render's standard error is a pseudo-terminal, so the child shows the same progress bar as in a
terminal; this module reads that bar (frames, passes, frames/s, ETA) and the child's messages.
A stop is SIGTERM, which `vlrt` handles exactly as Ctrl-C: finished frames are kept and `--resume`
continues. (SIGINT would not do: a server started in the background of a shell has SIGINT ignored,
and its children inherit that.)
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from dataclasses import dataclass

# tqdm's bar as `vlrt render` draws it: "render:  50%|█████     | 5/10 [00:01<00:01,  3.21frame/s, L1:7 L2:5]"
# (without a known length: "render: 5frame [00:01, 3.21frame/s, L1:7]").
_BAR = re.compile(
    r"render:\s*(?:\d+%\|[^|]*\|\s*)?(?P<done>\d+)(?:/(?P<total>\d+))?(?:frame)?\s*"
    r"\[(?P<elapsed>[^<,\]]*)(?:<(?P<eta>[^,\]]*))?,\s*(?P<rate>[^,\]]*)(?:,\s*(?P<passes>[^\]]*))?\]"
)
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class Progress:
    """The last state the child's progress bar showed."""

    done: int
    total: int | None
    rate: str
    eta: str | None
    passes: str

    def describe(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        eta = f" · ETA {self.eta}" if self.eta and self.eta != "?" else ""
        passes = f" · per pass {self.passes}" if self.passes else ""
        return f"{self.done}{total} frames{passes} · {self.rate}{eta}"


def parse_bar(line: str) -> Progress | None:
    """The progress in one redraw of the bar, or None for any other line."""
    m = _BAR.search(line)
    if m is None:
        return None
    total = m["total"]
    return Progress(int(m["done"]), int(total) if total else None, m["rate"].strip(), m["eta"], (m["passes"] or "").strip())


class Child:
    """One `vlrt` command in its own session, read through a pseudo-terminal as it runs."""

    def __init__(self, argv: list[str], columns: int = 300) -> None:
        self.argv = argv
        self.messages: list[str] = []
        self.progress: Progress | None = None
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vlrt", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                start_new_session=True,
            )
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()

    def _read(self, master: int) -> None:
        pending = ""
        with os.fdopen(master, "rb", buffering=0) as stream:
            while True:
                try:
                    chunk = stream.read(65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                pending += chunk.decode("utf-8", "replace")
                *lines, pending = re.split(r"[\r\n]", pending)
                self._take(lines)
        self._take([pending])

    def _take(self, lines: list[str]) -> None:
        for raw in lines:
            line = _ESCAPE.sub("", raw).strip()
            if not line:
                continue
            progress = parse_bar(line)
            if progress is not None:
                self.progress = progress
            else:
                self.messages.append(line)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def interrupt(self) -> None:
        """The child's Ctrl-C: it stops cleanly, keeping the finished frames."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout)
        self._reader.join()
        return code

    def error(self) -> str | None:
        """The child's one-line error (`vlrt: error: …`), or the last line it printed before failing."""
        for line in reversed(self.messages):
            if line.startswith("vlrt: error:"):
                return line
        code = self.process.poll()
        if code not in (None, 0, 130) and self.messages:
            return self.messages[-1]
        return None
