"""Background threads behind bounded queues, so decoding and encoding overlap inference.

Both helpers keep memory bounded (a full queue blocks the faster side) and move an exception
raised on the background thread to the thread that uses the results, where it can be
reported; a failure never disappears inside a daemon thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked put() looks at the stop flag
_END = object()


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put `item` unless `stop` is set first; True when it was queued."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(items: Iterable, q: queue.Queue, stop: threading.Event) -> None:
    """Worker of `Prefetched`. It holds no reference to the iterator object, so an abandoned
    iterator is collected, its `__del__` sets `stop`, and this thread ends."""
    iterator = iter(items)
    try:
        for item in iterator:
            if not _put(q, (item, None), stop):
                return
        _put(q, (_END, None), stop)
    except BaseException as exc:  # handed to the consumer, which decides
        _put(q, (_END, exc), stop)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


class Prefetched(Iterator[T]):
    """Items produced on a background thread; see `prefetch`."""

    def __init__(self, items: Iterable[T], maxsize: int, name: str) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._done = False
        threading.Thread(target=_produce, args=(items, self._queue, self._stop), name=name, daemon=True).start()

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if item is _END or self._done:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the worker; it closes the underlying iterator (releasing a decoder's file)."""
        self._done = True
        self._stop.set()
        with suppress(queue.Full):  # wakes a consumer blocked in another thread
            self._queue.put_nowait((_END, None))

    def __del__(self) -> None:
        self._stop.set()


def prefetch(items: Iterable[T], maxsize: int = 8, *, name: str = "vlrt-prefetch") -> Prefetched[T]:
    """Iterate `items` on a background thread, at most `maxsize` items ahead of the consumer.

    An exception raised while producing is re-raised to the consumer after the items before
    it. `close()` on the result stops the worker, which then closes `items` if it can.
    """
    return Prefetched(items, maxsize, name)


class BackgroundWorker(Generic[T]):
    """Run `consume(item)` for every submitted item, in order, on one background thread.

    At most `maxsize` items wait. The first exception raised by `consume` stops the worker and
    is re-raised by the next `submit` or by `finish`, so the producer learns of a failed
    encoder at its next frame rather than at the end of a long render.
    """

    def __init__(self, consume: Callable[[T], None], maxsize: int = 8, *, name: str = "vlrt-writer") -> None:
        self._consume = consume
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                return
            try:
                self._consume(item)
            except BaseException as exc:  # handed to the producer, which decides
                self._error = exc
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: T) -> None:
        """Queue `item`; raise the worker's exception if it has failed."""
        while True:
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise RuntimeError("background worker is no longer running")
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until every submitted item is consumed; raise the worker's exception if any."""
        if self._thread.is_alive():
            self.submit(_END)  # type: ignore[arg-type]
            self._thread.join()
        self._raise_if_failed()

    def cancel(self) -> None:
        """Stop without consuming what is still queued (used when the run failed anyway)."""
        self._stop.set()
        self._thread.join()
