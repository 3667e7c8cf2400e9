"""The etcd client keeps watches off the connection pool of every other request.

A watch ends by closing its connection (its stream never ends by itself); on a shared pool
the next request of the thread then paid a new TCP+TLS handshake (about 10 ms under load),
which sat on the path of every generation (a follower reads the head's chunks right after
the watch reported it) and of every acknowledged change. Real etcd, TLS and auth.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.backend import EtcdBackend
from cluster.etcd import EtcdClient, EtcdUnavailable
from cluster.store import WatchEvent
from cluster.watchstream import KeyStream
from ops.lab.etcd import ETCD, SKIP_REASON, EtcdCluster, secure_etcd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CLUSTER = "watchpool"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    cluster = secure_etcd(tmp_path_factory.mktemp("etcd-watch"), f"/{CLUSTER}/")
    try:
        yield cluster.start()
    finally:
        cluster.close()


def _sockets(store: EtcdClient) -> list[object]:
    """The open sockets of the request pool's idle connections (not the watch pool's)."""
    pools = store._session.get_adapter(store.endpoints[0]).poolmanager.pools  # type: ignore[attr-defined]
    out: list[object] = []
    for key in pools.keys():  # noqa: SIM118 (the container is not iterable)
        pool = pools[key]
        idle = list(pool.pool.queue) if pool.pool is not None else []
        out += [c.sock for c in idle if c is not None and c.sock is not None]
    return out


def test_a_watch_leaves_the_request_pool_alone(etcd: EtcdCluster, tmp_path: Path) -> None:
    b = EtcdBackend(etcd.endpoints, cluster_name=CLUSTER, **etcd.client_kwargs())  # type: ignore[arg-type]
    try:
        store = b.store
        assert isinstance(store, EtcdClient)
        key = b.keys.generation
        rev = b.put_value(key, b"head-1")
        assert b.get_value(key) == b"head-1"  # the pool holds a kept-alive connection now
        before = _sockets(store)
        assert before
        for i in range(5):  # as a follower does: watch, an event, then read what it names
            event = b.watch_key(key, 2.0, rev)  # the put at rev: reported at once
            assert event is not None and event.kind == "PUT"
            assert b.get_value(key) is not None
            rev = b.put_value(key, f"head-{i + 2}".encode())
        after = _sockets(store)
        assert after and all(any(a is b for b in before) for a in after), (
            "a watch cost the next request a new connection (TCP and TLS handshake)"
        )
    finally:
        b.close()


# -- the key's long-lived watch (cluster.watchstream.KeyStream) ---------------------------------


def _backend(etcd: EtcdCluster) -> EtcdBackend:
    kwargs: dict[str, Any] = etcd.client_kwargs()  # TLS files, user and password
    return EtcdBackend(etcd.endpoints, cluster_name=CLUSTER, **kwargs)


def _client(b: EtcdBackend) -> EtcdClient:
    assert isinstance(b.store, EtcdClient)
    return b.store


def _event(b: EtcdBackend, key: str, start: int, timeout: float = 2.0) -> WatchEvent:
    event = b.watch_key(key, timeout, start)
    assert event is not None, f"no event of {key} from revision {start} in {timeout} s"
    return event


def _alive(streams: list[KeyStream]) -> list[KeyStream]:
    return [s for s in streams if s._thread.is_alive()]


def test_successive_waits_share_one_watch(etcd: EtcdCluster) -> None:
    b = _backend(etcd)
    try:
        store = _client(b)
        key = f"/{CLUSTER}/stream/shared"
        revs: list[int] = []
        stream: KeyStream | None = None
        for i in range(30):  # as a follower does: wait for the change after the last one
            rev = b.put_value(key, f"v{i}".encode())
            revs.append(rev)
            event = _event(b, key, rev)
            assert (event.kind, event.key, event.value, event.mod_rev) == (
                "PUT", key, f"v{i}".encode(), rev
            )  # fmt: skip
            if stream is None:
                stream = store._streams[key]
            assert store._streams[key] is stream, f"wait {i} opened a new stream"
        assert stream is not None
        assert stream.opened == 1, f"{stream.opened} watches opened for 30 waits"
        assert stream.floor == revs[-1] + 1 and not stream.dead

        # a wait from a revision the stream has passed: a new stream, etcd replays history
        event = _event(b, key, revs[0])
        assert (event.value, event.mod_rev) == (b"v0", revs[0])
        replay = store._streams[key]
        assert replay is not stream and replay.opened == 1
        assert stream.dead  # replaced: closed
        assert [_event(b, key, r).mod_rev for r in revs[1:4]] == revs[1:4]  # in order
        assert store._streams[key] is replay
    finally:
        b.close()


def test_a_quiet_watch_is_reopened_without_losing_a_change(
    etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(KeyStream, "QUIET", 0.3)
    b = _backend(etcd)
    try:
        store = _client(b)
        key = f"/{CLUSTER}/stream/quiet"
        rev = b.put_value(key, b"q0")
        assert _event(b, key, rev).value == b"q0"
        stream = store._streams[key]
        assert b.watch_key(key, 1.0, rev + 1) is None  # quiet ~1 s: opened again meanwhile
        assert stream.opened >= 2
        rev = b.put_value(key, b"q1")
        event = _event(b, key, rev)
        assert (event.value, event.mod_rev) == (b"q1", rev)
        # changes made while nobody waits, across reopenings, are all delivered in order
        revs = []
        for i in range(2, 5):
            revs.append(b.put_value(key, f"q{i}".encode()))
            time.sleep(0.4)
        assert [(e.value, e.mod_rev) for e in (_event(b, key, r) for r in revs)] == [
            (f"q{i}".encode(), r) for i, r in zip(range(2, 5), revs, strict=True)
        ]
        assert store._streams[key] is stream and not stream.dead  # reopened, not replaced
        assert stream.opened >= 3
    finally:
        b.close()


def test_a_wait_from_a_compacted_revision_fails(etcd: EtcdCluster) -> None:
    b = _backend(etcd)
    try:
        store = _client(b)
        key = f"/{CLUSTER}/stream/compacted"
        old = b.put_value(key, b"c0")
        b.put_value(key, b"c1")
        now = b.put_value(key, b"c2")
        store._post("compact", "/kv/compaction", {"revision": now, "physical": True})
        with pytest.raises(EtcdUnavailable, match="compacted"):
            b.watch_key(key, 2.0, old)
        assert store._streams[key].dead
        rev = b.put_value(key, b"c3")
        event = _event(b, key, rev)  # a new stream, from a revision etcd still holds
        assert (event.value, event.mod_rev) == (b"c3", rev)
        assert not store._streams[key].dead
    finally:
        b.close()


def test_close_stops_every_watch(etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # a reader blocked on a quiet watch sees the stop when its read times out (QUIET s)
    monkeypatch.setattr(KeyStream, "QUIET", 2.0)
    b = _backend(etcd)
    store = _client(b)
    streams: list[KeyStream] = []
    try:
        for name in ("one", "two", "three"):
            key = f"/{CLUSTER}/stream/close-{name}"
            rev = b.put_value(key, name.encode())
            assert _event(b, key, rev).value == name.encode()
        assert b.watch_key(f"/{CLUSTER}/stream/close-now", 0.2) is None  # from now
        streams += store._streams.values()
        assert len(streams) == 4 and len(_alive(streams)) == 4
    finally:
        began = time.monotonic()
        b.close()
    for s in streams:
        s._thread.join(timeout=max(0.1, began + 7.0 - time.monotonic()))
    assert not _alive(streams), f"readers still running {time.monotonic() - began:.1f} s on"
    assert all(s.dead for s in streams) and store._streams == {}
