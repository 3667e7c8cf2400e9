"""A long-lived watch of one key, shared by successive waits on it (for :mod:`cluster.etcd`).

etcd's gateway ends a watch only when its connection closes, so a wait that opens its own
watch costs a new TCP+TLS connection each time, and a watch opened from a past revision is
served by etcd's catch-up loop (every 100 ms) rather than as changes commit. A
:class:`KeyStream` keeps one watch open in a reader thread and queues its events; a wait
takes the next event at or after the revision it asks for. What a wait may rely on is
unchanged: every change from its start revision on, in order, or an error.

* The reader reopens the watch from the revision after the last event it queued, so a
  reopened stream loses nothing: after :attr:`QUIET` seconds without a byte (a partition
  leaves a dead socket that never errs), or when the member's connection fails (the opener
  tries the other members).
* A failure the opener gives up on (no member answers, access refused, the revision was
  compacted) is queued once and raised to the next wait; the stream is dead then, and the
  next wait opens a new one (from the revision it asks for).
* A wait that asks for a revision the stream has passed (events already taken or skipped)
  gets a new stream from that revision: etcd replays history.
* A stream nobody waited on for :attr:`IDLE` seconds closes itself (an instance that
  became leader stops watching the generation key), as does one whose queue overflows.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator

from cluster.store import WatchEvent

# opener(resume, on_created, stop): the events of a watch opened from ``resume`` (None:
# from now; ``on_created`` gets the store revision the watch was created at), until the
# stream is quiet for ``quiet`` seconds (it returns) or fails (it raises)
Opener = Callable[[int | None, Callable[[int], None], threading.Event, float], Iterator[WatchEvent]]


NOT_CREATED = sys.maxsize  # the floor of a watch from now before etcd created it


class StreamOverflow(RuntimeError):
    """Events queued faster than they were waited for: the stream was closed."""


class KeyStream:
    QUIET = 5.0  # reopen a watch silent this long (no event, no byte)
    IDLE = 30.0  # close a stream no wait used for this long
    MAX_QUEUED = 4096

    def __init__(self, key: str, start: int | None, opener: Opener) -> None:
        self.key = key
        # every change from this revision on is still to come (earlier ones were taken,
        # skipped, or are before the start): a wait from an older revision needs a new
        # stream. A watch from now covers nothing known until etcd says when it began.
        self.floor = start if start is not None else NOT_CREATED
        self._resume = start  # where a reopened watch starts: after the last queued event
        self._opener = opener
        self._events: queue.Queue[WatchEvent | BaseException] = queue.Queue()
        self._used = time.monotonic()
        self._taking = threading.Lock()  # one wait at a time takes events
        self._stop = threading.Event()
        self.dead = False
        self.opened = 0  # watches opened (tests: one per stream while nothing fails)
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch {key}", daemon=True)
        self._thread.start()

    def serves(self, start: int | None) -> bool:
        """True when a wait from ``start`` can take its events from this stream."""
        return not self.dead and start is not None and start >= self.floor

    def next(self, start: int | None, deadline: float) -> WatchEvent | None:
        """The first event at or after ``start`` (None: any), or None at ``deadline``
        (``time.monotonic()``); the reader's failure is raised here."""
        self._used = time.monotonic()
        if not self._taking.acquire(timeout=max(0.0, deadline - self._used)):
            return None
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    item = self._events.get(timeout=left)
                except queue.Empty:
                    return None
                if isinstance(item, BaseException):
                    self.dead = True  # now, not when the reader's thread ends: the
                    raise item  # caller's next wait must get a new stream
                self.floor = max(self.floor, item.mod_rev + 1)
                if start is not None and item.mod_rev < start:
                    continue  # older than the wait asks for
                return item
        finally:
            self._used = time.monotonic()
            self._taking.release()

    def close(self) -> None:
        self.dead = True
        self._stop.set()

    def _idle(self) -> bool:
        """Nobody waits on the stream, and nobody did for :attr:`IDLE` seconds."""
        return not self._taking.locked() and time.monotonic() - self._used > self.IDLE

    def _created(self, revision: int) -> None:
        if self._resume is None:  # from now: the changes after the creation revision
            self._resume = self.floor = revision + 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._idle():
                    break
                self.opened += 1
                events = self._opener(self._resume, self._created, self._stop, self.QUIET)
                try:
                    for event in events:
                        self._resume = event.mod_rev + 1
                        if self._events.qsize() >= self.MAX_QUEUED:
                            raise StreamOverflow(f"watch of {self.key}: {self.MAX_QUEUED} "
                                                 "events queued and not taken")  # fmt: skip
                        self._events.put(event)
                        if self._stop.is_set() or self._idle():
                            break
                finally:
                    events.close()  # type: ignore[attr-defined]
        except BaseException as exc:  # taken by the next wait, which raises it
            self._events.put(exc)
        finally:
            self.dead = True
