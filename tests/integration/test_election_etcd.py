"""Leader election on a real 3-member etcd, electors in separate processes (TTL 2 s).

Measured: kill -9 of the leader -> the peer leads within TTL + 1 s; SIGTERM (resign) ->
within 1 s; a leader SIGSTOPped for 3 x TTL and resumed performs no fenced effect, and
the effect history in etcd shows every effect committed under the epoch that was current.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.backend import EtcdBackend
from cluster.election import Elector
from ops.lab.etcd import ETCD, SKIP_REASON, EtcdCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
TTL = 2


@pytest.fixture(scope="module")
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd3"), size=3)
    try:
        yield cluster.start()
    finally:
        cluster.close()


class ElectorProc:
    """A ``ops.lab.elector_proc`` child with its JSON events collected by a thread."""

    def __init__(self, ident: str, endpoints: list[str], cluster: str, log_dir: Path) -> None:
        self.ident = ident
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.stderr = open(log_dir / f"elector-{ident}.log", "wb")  # noqa: SIM115
        argv = [sys.executable, "-m", "ops.lab.elector_proc", "--id", ident]
        argv += ["--endpoints", ",".join(endpoints), "--cluster", cluster, "--ttl", str(TTL)]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))

    def find(self, event: str, after: float = 0.0) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == event and e["t"] >= after]

    def wait(self, event: str, timeout: float, after: float = 0.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(event, after)
            if found:
                return found[0]
            if self.proc.poll() is not None and not self.find(event, after):
                break
            time.sleep(0.01)
        pytest.fail(
            f"{self.ident}: no {event!r} event within {timeout} s; events: {self.events[-5:]}"
        )

    def signal(self, sig: int) -> float:
        t = time.monotonic()
        os.kill(self.proc.pid, sig)
        return t

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.stderr.close()


def test_failover_and_fencing_across_processes(etcd3: EtcdCluster, tmp_path: Path) -> None:
    cluster = f"el{secrets.token_hex(4)}"
    procs: dict[str, ElectorProc] = {}

    def spawn(ident: str) -> ElectorProc:
        procs[ident] = ElectorProc(ident, etcd3.endpoints, cluster, tmp_path)
        return procs[ident]

    measured: dict[str, float] = {}
    try:
        a = spawn("a")
        e_a = a.wait("elected", 15)["epoch"]
        b = spawn("b")
        b.wait("started", 15)
        time.sleep(0.3)
        assert not b.find("elected")

        # 1. kill -9 the leader: the lease has to expire first
        t_kill = a.signal(signal.SIGKILL)
        ev = b.wait("elected", TTL + 3, after=t_kill)
        measured["kill -9"] = ev["t"] - t_kill
        assert ev["epoch"] > e_a
        assert measured["kill -9"] < TTL + 1, measured
        e_b = ev["epoch"]

        # 2. SIGTERM the leader: it revokes its lease, the peer takes over at once
        a2 = spawn("a2")
        a2.wait("started", 15)
        time.sleep(0.3)
        t_term = b.signal(signal.SIGTERM)
        ev = a2.wait("elected", 3, after=t_term)
        measured["SIGTERM"] = ev["t"] - t_term
        assert measured["SIGTERM"] < 1.0, measured
        assert b.proc.wait(5) == 0
        e_a2 = ev["epoch"]
        assert e_a2 > e_b

        # 3. SIGSTOP the leader for 3 x TTL: the peer takes over; the old one, resumed,
        #    must not get any effect committed.
        c = spawn("c")
        c.wait("started", 15)
        time.sleep(0.5)  # a2 ticks a few times under its epoch
        t_stop = a2.signal(signal.SIGSTOP)
        ev = c.wait("elected", TTL + 3, after=t_stop)
        measured["SIGSTOP"] = ev["t"] - t_stop
        e_c = ev["epoch"]
        time.sleep(max(0.0, t_stop + 3 * TTL - time.monotonic()))
        t_cont = a2.signal(signal.SIGCONT)
        stale = a2.wait("stale_attempt", 5, after=t_cont)
        assert stale["epoch"] == e_a2 and stale["ok"] is False
        time.sleep(0.5)  # a2 would tick now if it still believed it led
        assert not a2.find("tick", after=t_cont)
        a2.wait("demoted", 3)
        assert c.find("tick", after=t_cont)  # the new leader keeps working

        # the history in etcd: every effect committed under the then-current epoch
        backend = EtcdBackend(etcd3.endpoints, cluster_name=cluster)
        try:
            effects = backend.effects()
        finally:
            backend.close()
        epochs = sorted([e_a, e_b, e_a2, e_c])
        assert len(set(epochs)) == 4
        assert {e.effect for e in effects} == {"tick"}
        for eff in effects:
            assert eff.epoch in epochs
            newer = [e for e in epochs if eff.epoch < e <= eff.revision]
            assert not newer, f"{eff} committed after epoch {newer} began"
        seq = [e.epoch for e in effects]
        assert seq == sorted(seq), "effects of two epochs interleave"
        assert {e.instance_id for e in effects if e.epoch == e_a2} == {"a2"}
        assert max(e.revision for e in effects if e.epoch == e_a2) < e_c
        assert {e.epoch for e in effects} >= {e_a, e_a2, e_c}
        print(
            "\nfailover (TTL 2 s): "
            + ", ".join(f"{k} -> peer leads after {v * 1000:.0f} ms" for k, v in measured.items())
            + f"; {len(effects)} effects over epochs {epochs}"
        )
    finally:
        for p in procs.values():
            p.close()


def test_leader_survives_loss_of_one_etcd_member(etcd3: EtcdCluster) -> None:
    cluster = f"m{secrets.token_hex(4)}"
    backend = EtcdBackend(etcd3.endpoints, cluster_name=cluster, timeout=0.5)
    demoted: list[float] = []
    el = Elector(backend, "x", ttl=5, on_demoted=lambda: demoted.append(time.monotonic()))
    el.start()
    try:
        deadline = time.monotonic() + 10
        while not el.is_leader() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert el.is_leader()
        epoch = el.epoch
        etcd3.stop_member(0)  # the member the client talks to first
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4:  # more than one keep-alive round (5/3 s)
            assert el.is_leader(), "stepped down although two of three members answer"
            time.sleep(0.05)
        assert el.epoch == epoch
        assert el.commit("after-member-loss").epoch == epoch
        assert not demoted
    finally:
        el.stop()
        backend.close()
        etcd3.start_member(0)
