"""WAL observers (the seed's WALEntryObserver) behind a bounded queue, so they never block writers.

Writers publish events with `put_nowait` on a bounded queue; one dispatcher thread calls the
observers. When the queue is full the event is dropped and every observer later gets `on_missed`:
it must then re-read the log with `entries_from` from the last position it knows. An observer that
raises is logged and kept; its error never reaches a writer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Protocol

from kevo_repl.wal.codec import Entry

log = logging.getLogger(__name__)


class WalObserver(Protocol):
    def on_entry_written(self, entry: Entry) -> None: ...

    def on_batch_written(self, start_seq: int, entries: Sequence[Entry]) -> None: ...

    def on_synced(self, up_to_seq: int) -> None: ...

    def on_missed(self) -> None:
        """Events were dropped because this side fell behind; re-read the log to catch up."""


_Event = tuple[str, object, object]
_STOP: _Event = ("stop", None, None)


class ObserverHub:
    def __init__(self, queue_max: int) -> None:
        self.observers: tuple[WalObserver, ...] = ()
        self._queue: queue.Queue[_Event] = queue.Queue(maxsize=queue_max)
        self._missed = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, observer: WalObserver) -> None:
        with self._lock:
            self.observers = (*self.observers, observer)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kevo-wal-observers", daemon=True
                )
                self._thread.start()

    def remove(self, observer: WalObserver) -> None:
        with self._lock:
            self.observers = tuple(o for o in self.observers if o is not observer)

    def publish(self, kind: str, a: object, b: object = None) -> None:
        try:
            self._queue.put_nowait((kind, a, b))
        except queue.Full:
            self._missed = True

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        # Blocking put: the dispatcher is draining, so room appears; bounded by the join timeout.
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.warning("WAL observer queue stayed full at close; dispatcher abandoned")
            return
        thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            if self._missed:
                self._missed = False
                self._deliver("missed", None, None)
            self._deliver(*event)

    def _deliver(self, kind: str, a: object, b: object) -> None:
        for obs in self.observers:
            try:
                if kind == "entry":
                    obs.on_entry_written(a)  # type: ignore[arg-type]
                elif kind == "batch":
                    obs.on_batch_written(a, b)  # type: ignore[arg-type]
                elif kind == "sync":
                    obs.on_synced(a)  # type: ignore[arg-type]
                else:
                    obs.on_missed()
            except Exception:
                log.exception("WAL observer %r failed on %s", obs, kind)
