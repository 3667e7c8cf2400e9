"""The etcd client keeps watches off the connection pool of every other request.

A watch ends by closing its connection (its stream never ends by itself); on a shared pool
the next request of the thread then paid a new TCP+TLS handshake (about 10 ms under load),
which sat on the path of every generation (a follower reads the head's chunks right after
the watch reported it) and of every acknowledged change. Real etcd, TLS and auth.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.backend import EtcdBackend
from cluster.etcd import EtcdClient
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
    pools = store._session.get_adapter(store.endpoints[0]).poolmanager.pools
    out: list[object] = []
    for key in pools.keys():  # noqa: SIM118 (the container is not iterable)
        pool = pools[key]
        idle = list(pool.pool.queue) if pool.pool is not None else []
        out += [c.sock for c in idle if c is not None and c.sock is not None]
    return out


def test_a_watch_leaves_the_request_pool_alone(etcd: EtcdCluster, tmp_path: Path) -> None:
    b = EtcdBackend(etcd.endpoints, cluster_name=CLUSTER, **etcd.client_kwargs())
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
