"""Standard input and output as byte pipes: prompt reads, exact reads, closed-reader errors."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from vlrt.errors import OutputClosed


class PipeReader:
    """A read-only, unseekable view of a byte stream whose `read(n)` returns what has arrived.

    FFmpeg asks for whole buffers; a plain `read(n)` on a pipe waits until n bytes came or
    the writer closed, which stalls decoding behind a slow producer. `read1` returns as soon
    as anything is there. Having no `seek` tells PyAV the input is a stream.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._read = getattr(stream, "read1", None) or stream.read

    def read(self, size: int = -1) -> bytes:
        return self._read(size)


def read_exactly(stream: BinaryIO, size: int) -> bytearray:
    """Read `size` bytes, fewer only at end of stream (pipes deliver in arbitrary pieces)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    del view
    return buffer if got == size else buffer[:got]


@contextmanager
def _reader_gone_is_output_closed() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) or exc.errno in (errno.EPIPE, errno.ECONNRESET):
            raise OutputClosed(
                f"output pipe closed by the reader: {exc.strerror or exc}; "
                "keep the reading program running until vlrt finishes"
            ) from exc
        raise


class PipeWriter:
    """Write side of standard output: turns a vanished reader into `OutputClosed`.

    `flush()` pushes bytes through Python's buffer at once, so the reader gets every frame
    when it is done rather than when a buffer happens to fill.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        with _reader_gone_is_output_closed():
            self._stream.write(data)
        return len(data)

    def flush(self) -> None:
        with _reader_gone_is_output_closed():
            self._stream.flush()
