"""KeyStream: one long-lived watch of a key, shared by successive waits on it.

A fake opener stands in for etcd: each call records the revision it was asked to resume
from and yields what the test feeds it (events, "created", a quiet return, a failure), so
every step is driven by the test and every wait is bounded.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from cluster.store import WatchEvent
from cluster.watchstream import KeyStream, StreamOverflow

pytestmark = pytest.mark.timeout(30)

KEY = "/c/gen"
WAIT = 2.0  # the longest any step of these tests waits for the reader


def ev(rev: int) -> WatchEvent:
    return WatchEvent(kind="PUT", key=KEY, value=f"v{rev}".encode(), mod_rev=rev)


def soon(seconds: float = WAIT) -> float:
    return time.monotonic() + seconds


@dataclass(frozen=True)
class Created:
    """Fed to the opener: etcd answered the create at this store revision."""

    revision: int


class Quiet:
    """Fed to the opener: the watch was quiet for its ``quiet`` seconds (it returns)."""


QUIET = Quiet()


class FakeOpener:
    """``opener(resume, on_created, stop, quiet)`` over a feed the test fills."""

    def __init__(self, fail_open: BaseException | None = None) -> None:
        self.feed: queue.Queue[WatchEvent | Created | Quiet | BaseException] = queue.Queue()
        self.calls: queue.Queue[int | None] = queue.Queue()  # each call's resume
        self.resumes: list[int | None] = []
        self.fail_open = fail_open  # raised by the opener itself (not by its events)

    def __call__(
        self,
        resume: int | None,
        on_created: Callable[[int], None],
        stop: threading.Event,
        quiet: float,
    ) -> Iterator[WatchEvent]:
        self.resumes.append(resume)
        self.calls.put(resume)
        if self.fail_open is not None:
            raise self.fail_open
        return self._events(on_created, stop, quiet)

    def _events(
        self, on_created: Callable[[int], None], stop: threading.Event, quiet: float
    ) -> Iterator[WatchEvent]:
        last = time.monotonic()
        while not stop.is_set():
            try:
                item = self.feed.get(timeout=0.01)
            except queue.Empty:
                if time.monotonic() - last > quiet:
                    return  # quiet: the stream opens it again
                continue
            last = time.monotonic()
            if isinstance(item, Quiet):
                return
            if isinstance(item, Created):
                on_created(item.revision)
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def next_call(self) -> int | None:
        """The resume of the opener's next call (fails when none comes in time)."""
        try:
            return self.calls.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail("the stream did not open the watch (again)")


@pytest.fixture
def streams() -> Iterator[list[KeyStream]]:
    """Streams a test made; closed and their readers joined at its end."""
    made: list[KeyStream] = []
    yield made
    for s in made:
        s.close()
    for s in made:
        s._thread.join(timeout=WAIT)
        assert not s._thread.is_alive()


@pytest.fixture
def short_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream closes after 0.3 s unused, and reopens a watch quiet for 0.05 s."""
    monkeypatch.setattr(KeyStream, "IDLE", 0.3)
    monkeypatch.setattr(KeyStream, "QUIET", 0.05)


def stream(streams: list[KeyStream], start: int | None, opener: FakeOpener) -> KeyStream:
    s = KeyStream(KEY, start, opener)
    streams.append(s)
    return s


def test_successive_waits_share_one_watch_in_order(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 10, opener)
    assert opener.next_call() == 10
    for rev in (10, 11, 12):
        opener.feed.put(ev(rev))
    assert s.next(10, soon()) == ev(10)
    assert s.next(11, soon()) == ev(11)
    assert s.next(None, soon()) == ev(12)  # None: whatever comes next
    opener.feed.put(ev(15))  # fed after the wait began: delivered as it comes
    assert s.next(13, soon()) == ev(15)
    assert s.opened == 1 and opener.resumes == [10]
    assert s.floor == 16 and s.serves(16) and not s.dead


def test_events_before_the_start_asked_are_skipped(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 5, opener)
    assert s.floor == 5 and s.serves(5) and not s.serves(4)
    for rev in (5, 6, 7, 8):
        opener.feed.put(ev(rev))
    assert s.next(7, soon()) == ev(7)  # 5 and 6 are older than the wait asks for
    assert s.floor == 8
    assert not s.serves(6) and not s.serves(7)  # passed: a new stream replays them
    assert s.serves(8) and s.serves(100)
    assert not s.serves(None)  # "from now" is never served by a running stream
    assert s.next(8, soon()) == ev(8)
    assert s.floor == 9 and s.opened == 1


def test_a_closed_stream_serves_nothing(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 3, opener)
    assert s.serves(3)
    s.close()
    assert s.dead and not s.serves(3) and not s.serves(1000)
    s._thread.join(timeout=WAIT)
    assert not s._thread.is_alive()  # close() stops the reader
    assert s.next(3, soon(0.1)) is None


def test_a_quiet_watch_is_reopened_after_the_last_event(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 10, opener)
    assert opener.next_call() == 10
    opener.feed.put(ev(10))
    opener.feed.put(ev(11))
    opener.feed.put(QUIET)
    assert opener.next_call() == 12  # reopened from the revision after the last event
    assert s.next(10, soon()) == ev(10)
    assert s.next(11, soon()) == ev(11)
    opener.feed.put(ev(12))
    assert s.next(12, soon()) == ev(12)
    assert s.opened == 2 and opener.resumes == [10, 12]
    assert not s.dead


def test_a_quiet_watch_without_events_reopens_where_it_was(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 7, opener)
    assert opener.next_call() == 7
    opener.feed.put(QUIET)
    assert opener.next_call() == 7
    opener.feed.put(ev(9))
    assert s.next(7, soon()) == ev(9)
    assert s.opened == 2


def test_from_now_reopens_after_the_creation_revision(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, None, opener)
    assert opener.next_call() is None  # from now
    # before etcd created it, it covers no revision: a wait from revision 5 may ask for
    # changes before the watch began, so it gets a stream of its own
    assert not s.serves(None) and not s.serves(5) and not s.serves(10**6)
    opener.feed.put(Created(20))
    opener.feed.put(QUIET)
    assert opener.next_call() == 21  # from the change after the one it was created at
    assert s.floor == 21 and s.serves(21) and not s.serves(20)
    opener.feed.put(ev(21))
    assert s.next(None, soon()) == ev(21)
    assert opener.resumes == [None, 21]


def test_created_does_not_move_an_explicit_start(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 5, opener)
    assert opener.next_call() == 5
    opener.feed.put(Created(20))  # a watch from a past revision: etcd replays 5..20
    opener.feed.put(QUIET)
    assert opener.next_call() == 5
    assert s.floor == 5


def test_a_failing_watch_raises_to_the_next_wait(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 10, opener)
    opener.feed.put(ev(10))
    opener.feed.put(RuntimeError("no member answered"))
    assert s.next(10, soon()) == ev(10)  # what came before the failure is delivered first
    with pytest.raises(RuntimeError, match="no member answered"):
        s.next(11, soon())
    assert s.dead and not s.serves(11)
    s._thread.join(timeout=WAIT)
    assert not s._thread.is_alive()
    assert s.opened == 1  # a failure is not retried by the stream: the next wait opens anew
    assert s.next(11, soon(0.1)) is None  # raised once


def test_an_opener_that_raises_fails_the_next_wait(streams: list[KeyStream]) -> None:
    opener = FakeOpener(fail_open=PermissionError("access refused"))
    s = stream(streams, 4, opener)
    with pytest.raises(PermissionError, match="access refused"):
        s.next(4, soon())
    assert s.dead and not s.serves(4)
    s._thread.join(timeout=WAIT)
    assert not s._thread.is_alive()
    assert opener.resumes == [4]


def test_an_overflowing_queue_fails_the_waiter(
    streams: list[KeyStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(KeyStream, "MAX_QUEUED", 3)
    opener = FakeOpener()
    s = stream(streams, 1, opener)
    for rev in range(1, 7):
        opener.feed.put(ev(rev))
    s._thread.join(timeout=WAIT)  # the reader gives up on the fourth event
    assert not s._thread.is_alive() and s.dead
    assert [s.next(1, soon()) for _ in range(3)] == [ev(1), ev(2), ev(3)]
    with pytest.raises(StreamOverflow):
        s.next(4, soon())
    assert not s.serves(4)


def test_an_unused_stream_closes_itself(streams: list[KeyStream], short_idle: None) -> None:
    opener = FakeOpener()
    s = stream(streams, 1, opener)
    s._thread.join(timeout=WAIT)
    assert not s._thread.is_alive()
    assert s.dead and not s.serves(1)
    assert s.opened >= 2  # it was quiet (reopened) before it was idle


def test_a_stream_in_use_stays_open(streams: list[KeyStream], short_idle: None) -> None:
    opener = FakeOpener()
    s = stream(streams, 1, opener)
    until = time.monotonic() + 0.9  # three IDLEs, each bridged by short waits
    while time.monotonic() < until:
        assert s.next(1, soon(0.1)) is None
    assert s._thread.is_alive() and not s.dead and s.serves(1)
    opener.feed.put(ev(2))
    assert s.next(1, soon()) == ev(2)


def test_a_wait_longer_than_idle_keeps_its_stream(
    streams: list[KeyStream], short_idle: None
) -> None:
    """One wait that lasts longer than IDLE: the stream is in use all along, so a change
    that comes late in the wait is delivered to it."""
    opener = FakeOpener()
    s = stream(streams, 1, opener)
    timer = threading.Timer(0.8, lambda: opener.feed.put(ev(5)))
    timer.start()
    try:
        assert s.next(1, soon(1.5)) == ev(5)
    finally:
        timer.join()
    assert not s.dead


def test_a_wait_returns_none_at_its_deadline(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 1, opener)
    began = time.monotonic()
    assert s.next(1, began + 0.2) is None
    took = time.monotonic() - began
    assert 0.15 <= took < 1.0
    assert s.next(1, time.monotonic() - 1) is None  # a deadline passed: at once
    opener.feed.put(ev(3))
    assert s.next(1, soon()) == ev(3)  # the stream still serves after a wait in vain
    assert s.opened == 1


def test_a_deadline_passing_while_older_events_are_skipped(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 1, opener)
    for rev in (1, 2, 3):
        opener.feed.put(ev(rev))
    assert s.next(10, soon(0.3)) is None  # only older events came
    assert s.floor == 4  # they were taken (skipped)
    opener.feed.put(ev(10))
    assert s.next(10, soon()) == ev(10)


def test_close_stops_the_reader(streams: list[KeyStream]) -> None:
    opener = FakeOpener()
    s = stream(streams, 1, opener)
    assert opener.next_call() == 1
    opener.feed.put(ev(1))
    assert s.next(1, soon()) == ev(1)
    s.close()
    s._thread.join(timeout=WAIT)
    assert not s._thread.is_alive()
    assert s.dead and not s.serves(2)
    assert s.opened == 1  # stopped, not reopened
    opener.feed.put(ev(2))
    assert s.next(2, soon(0.2)) is None  # nobody reads the watch any more
