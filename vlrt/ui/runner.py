"""`vlrt` commands run as child processes, exactly as a user would type them.

A render's standard error is a pseudo-terminal, so the child shows the same progress bar as in a
terminal; this module reads that bar (frames, passes, frames/s, ETA) and the child's messages.
A stop is SIGTERM, which `vlrt` handles exactly as Ctrl-C: finished frames are kept and `--resume`
continues. (SIGINT would not do: a server started in the background of a shell has SIGINT ignored,
and its children inherit that.)

Each child has its own waiter thread that reaps it the moment it exits, so whether it has ended
never depends on someone polling it (a page that stopped asking once left a zombie behind).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
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
READER_GRACE_S = 5.0  # how long an ended child's last output may take to arrive


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
        master, self._slave = pty.openpty()
        fcntl.ioctl(self._slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vlrt", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._slave, start_new_session=True,
            )
        except BaseException:
            os.close(master)
            os.close(self._slave)
            raise
        self._exited = threading.Event()
        self._ended = threading.Event()
        self.code: int | None = None
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        code = self.process.wait()
        self._exited.set()
        self._reader.join(READER_GRACE_S)  # its last lines; a grandchild holding the terminal must not block this
        os.close(self._slave)
        self.code = code
        self._ended.set()

    def _read(self, master: int) -> None:
        """Read until the child has exited and nothing is left. This process keeps the terminal's other
        end open meanwhile: when the last holder closes it, Linux hangs the terminal up and what the
        child wrote last (its error line) can be lost before it is read."""
        pending = ""
        try:
            while True:
                if not select.select([master], [], [], 0.1)[0]:
                    if self._exited.is_set():
                        break
                    continue
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal was hung up
                    break
                if not chunk:
                    break
                pending += chunk.decode("utf-8", "replace")
                *lines, pending = re.split(r"[\r\n]", pending)
                self._take(lines)
        finally:
            os.close(master)
        self._take([pending])

    def _take(self, lines: list[str]) -> None:
        for raw in lines:
            line = _ESCAPE.sub("", raw).strip()
            if not line:
                continue
            progress = parse_bar(line)
            if progress is None:
                self.messages.append(line)
                continue
            self.progress = progress
            after = line[_BAR.search(line).end():].strip()  # a message printed over the bar, no newline between
            if after:
                self.messages.append(after)

    @property
    def running(self) -> bool:
        """Whether the child is still at work (false once it has exited and its output has been read)."""
        return not self._ended.is_set()

    def interrupt(self) -> None:
        """The child's Ctrl-C: it stops cleanly, keeping the finished frames."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.argv, timeout or 0)
        assert self.code is not None
        return self.code

    def error(self) -> str | None:
        """The child's one-line error (`vlrt: error: …`), or the last line it printed before failing."""
        for line in reversed(self.messages):
            if line.startswith("vlrt: error:"):
                return line
        if self.code not in (None, 0, 130) and self.messages:
            return self.messages[-1]
        return None
