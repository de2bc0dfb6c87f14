"""Read batches ahead on a background thread, so the device does not wait on the host.

The reader is a pure function `read(position) -> (batch, next_position)`, so read-ahead never
changes what is returned: the consumer's position is that after the batches it actually got,
and a position the thread did not start from (a restore) simply restarts it there.
"""
from __future__ import annotations

import queue
import threading


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    def __init__(self, read, depth: int):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._read, self._depth = read, depth
        self._thread, self._stop, self._queue, self._expect = None, None, None, None

    def next(self, position):
        """The batch at `position` and the position after it."""
        if self._thread is None or position != self._expect:
            self._start(position)
        item = self._queue.get()
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        self._expect = item[1]
        return item

    def _start(self, position):
        self.close()
        self._stop, self._queue = threading.Event(), queue.Queue(self._depth)
        self._thread = threading.Thread(target=self._run, name="jaxlm-data-prefetch",
                                        args=(position, self._stop, self._queue), daemon=True)
        self._expect = position
        self._thread.start()

    def _run(self, position, stop, out):
        while not stop.is_set():
            try:
                item = self._read(position)
                position = item[1]
            except BaseException as e:  # noqa: BLE001 (handed to the consumer, who re-raises)
                item = _Failed(e)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return

    def close(self):
        """Stop the thread (waits for the batch it is reading)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
