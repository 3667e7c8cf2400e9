"""The pairing listener keeps serving while etcd is frozen (its store writes run off the loop).

A real etcd, an elected :class:`~cluster.election.Elector` and the
:class:`~dispatcher.ha.writer.FencedWriter` a leader's listener writes through; the
listener runs in its own event loop (as in the API daemon, where the health port shares
that loop). etcd is frozen with SIGSTOP, then one agent sends a valid request: queueing it
commits to etcd first and waits for the client timeout. Meanwhile another connection is
answered at once and the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.backend import EtcdBackend
from cluster.election import Elector
from dispatcher.config import DispatcherConfig
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.writer import FencedWriter
from ops.lab.etcd import ETCD, SKIP_REASON, EtcdCluster
from ops.lab.proc import wait_until
from tests.integration.test_pairing import Listener, cfg, listen, pair_raw, request_body

__all__ = ["cfg", "listen"]  # the pairing fixtures

pytestmark = [pytest.mark.integration, pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)]

STORE_TIMEOUT = 3.0  # per etcd call: the frozen write blocks this long at least


def test_frozen_etcd_does_not_block_other_pairing_connections(
    tmp_path: Path, cfg: DispatcherConfig, listen: Callable[..., Listener]
) -> None:
    etcd = EtcdCluster(tmp_path / "etcd").start()
    backend = EtcdBackend(etcd.endpoints, cluster_name="offload", timeout=STORE_TIMEOUT)
    elector = Elector(backend, "a", ttl=30).start()
    frozen = False
    try:
        wait_until(elector.is_leader, 10, "the elector to lead")
        health = ClusterHealth()
        health.mark_ok()
        writer = FencedWriter(elector, health=health, effect_for=lambda p: "pairing-write")
        lst = listen(cfg, writer=writer)
        etcd.pause()
        frozen = True
        slow: dict[str, Any] = {}

        def first_agent() -> None:
            t0 = time.monotonic()
            try:
                s, fh, answer = pair_raw(lst.port, request_body("slow.example"))
                fh.close()
                s.close()
                slow["answer"] = answer
            except Exception as exc:  # recorded, checked below
                slow["error"] = repr(exc)
            slow["took"] = time.monotonic() - t0

        t = threading.Thread(target=first_agent, daemon=True)
        t.start()
        time.sleep(0.5)  # its request is in the frozen commit now
        assert "took" not in slow, slow
        lags: list[float] = []
        answers: list[float] = []
        for _ in range(5):
            t0 = time.monotonic()
            lst.call(asyncio.sleep(0), timeout=10)
            lags.append(time.monotonic() - t0)
            t0 = time.monotonic()
            s, fh, other = pair_raw(lst.port, {"hostname": "other.example"})
            fh.close()
            s.close()
            answers.append(time.monotonic() - t0)
            assert other == {"status": "error", "reason": "invalid request"}
        t.join(STORE_TIMEOUT * 4)
        assert not t.is_alive()
        print(f"[offload] etcd frozen: loop round trip max {max(lags) * 1000:.0f} ms, "
              f"other connection answered in max {max(answers) * 1000:.0f} ms; "
              f"the frozen request answered after {slow['took']:.2f} s: "
              f"{json.dumps(slow.get('answer') or slow.get('error'))}")  # fmt: skip
        assert max(lags) < 0.5, lags
        assert max(answers) < 1.0, answers
        assert slow["took"] >= STORE_TIMEOUT * 0.9  # it really was stuck in the store
        # the frozen request was refused with a clear answer, not queued
        assert slow.get("answer") == {
            "status": "error",
            "reason": "pairing unavailable, try again later",
        }, slow
        assert not list(Path(cfg.pairing_dir).glob("*.json"))
    finally:
        if frozen:
            etcd.resume()
        elector.stop(resign=True)
        backend.close()
        etcd.close()
