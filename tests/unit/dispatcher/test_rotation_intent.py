"""Intent-first rotation in a cluster (dispatcher.ha.rotation_intent), on the embedded backend.

A real elector and fenced writer on a local state dir; in-memory fakes for what is not
under test: the replication acknowledgement (records when it was asked) and the agents
(``/rotate-serial`` applied to one trust map per agent). The real agents, etcd and a
kill -9 of the leader are in tests/integration/test_rotation_failover.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.common.serial import serial_to_hex
from cluster.backend import LocalBackend
from cluster.election import Elector
from dispatcher.core import Dispatcher
from dispatcher.ha import actions, rotation_intent
from dispatcher.ha.replication import NotAcknowledged
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.writer import FencedWriter
from dispatcher.pki import ca as pki
from dispatcher.pki import rotation
from dispatcher.pki import rotation_state as rs
from dispatcher.registry import Target
from ops.lab.dispatcherenv import make_env

AGENTS = ("web1", "web2", "web3")


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []


class FakeReplication:
    """``acknowledge`` counts a generation and records that it was asked."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self._generation = 1
        self.fail = False

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def changes(self) -> int:
        return 0

    def acknowledge(self, after: int, epoch: int | None = None) -> int:
        if self.fail:
            self.events.log.append(("ack-failed",))
            raise NotAcknowledged("generation not applied by a majority in time")
        self._generation = max(self._generation, after) + 1
        self.events.log.append(("ack", str(self._generation)))
        return self._generation


class FakeAgents:
    """One trust map per agent; ``/rotate-serial`` applied as the agent would."""

    def __init__(self, events: Events, trusted: str) -> None:
        self.events = events
        self.maps = {n: {serial_to_hex(trusted)} for n in AGENTS}
        self.down: set[str] = set()

    async def send(self, d: Dispatcher, targets: Sequence[Target], serial: str, action: str,
                   ctxs: Sequence[Any], timeout: float | None = None) -> dict[str, str]:  # fmt: skip
        out: dict[str, str] = {}
        for t in targets:
            if t.name in self.down:
                out[t.name] = "connection refused"
                continue
            self.events.log.append((action, t.name, serial))
            if action == "add":
                self.maps[t.name].add(serial_to_hex(serial))
            else:
                self.maps[t.name].discard(serial_to_hex(serial))
            out[t.name] = ""
        return out


class Lab:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        env = make_env(root)
        self.cfg = env.d.cfg
        self.backend = LocalBackend(root / "cluster")
        self.elector = Elector(self.backend, "a", ttl=2).start()
        deadline = time.monotonic() + 5
        while not self.elector.is_leader():
            assert time.monotonic() < deadline, "no leadership"
            time.sleep(0.02)
        health = ClusterHealth()
        health.mark_ok()
        self.writer = FencedWriter(self.elector, health=health)
        self.events = Events()
        self.rep = FakeReplication(self.events)
        self.d = Dispatcher(self.cfg, writer=self.writer, replication=self.rep)
        self.old = pki.cert_serial_hex(self.cfg.cert)
        for i, name in enumerate(AGENTS):
            self.d.registry.register(name, ip=f"127.0.0.{i + 2}", port=7443, lookup_by="ip",
                                     dispatcher_serial=self.old)  # fmt: skip
        self.agents = FakeAgents(self.events, self.old)
        monkeypatch.setattr(rotation, "_send_serial", self.agents.send)

    def intent(self) -> rotation_intent.Intent | None:
        return rotation_intent.read(self.backend)

    def state(self) -> rs.RotationState:
        s = rs.load(self.cfg.rotation_file)
        assert s is not None
        return s

    def installed(self) -> str:
        return pki.cert_serial_hex(self.cfg.cert)

    def close(self) -> None:
        self.elector.stop(resign=True, timeout=3)
        self.backend.close()


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    lab = Lab(tmp_path, monkeypatch)
    try:
        yield lab
    finally:
        lab.close()


class Killed(BaseException):
    """The leader process dies here (nothing after it runs, no install)."""


def kill_after_telling(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """rotate-cert whose leader dies once the agents were told (install never happens)."""

    def die(step: str) -> None:
        if step == "rotation-told":
            raise Killed(step)

    monkeypatch.setattr(rotation, "pause_point", die)
    monkeypatch.setattr(rotation, "_install", lambda *a: None)  # a dead process installs nothing
    with pytest.raises(Killed):
        actions.perform(lab.d, "rotate-cert")
    monkeypatch.undo()
    monkeypatch.setattr(rotation, "_send_serial", lab.agents.send)


def test_intent_is_recorded_and_acknowledged_before_any_agent_is_told(lab: Lab) -> None:
    res = actions.perform(lab.d, "rotate-cert")
    new = res.data["new_serial"]
    log = lab.events.log
    first_add = next(i for i, e in enumerate(log) if e[0] == "add")
    assert log[0][0] == "ack" and first_add > 0  # the intent's generation, then the broadcast
    assert log[-1][0] == "ack"  # the finished rotation is acknowledged too
    assert res.generation == int(log[-1][1])
    effects = [e.effect for e in lab.backend.effects()]
    assert effects.index("rotation-intent") < effects.index("cert-rotate")
    assert "rotation-done" in effects and lab.intent() is None
    assert lab.installed() == new and not lab.state().unfinished
    assert all(m == {serial_to_hex(lab.old), serial_to_hex(new)} for m in lab.agents.maps.values())


def test_not_acknowledged_intent_tells_nobody_then_recovery_finishes(lab: Lab) -> None:
    lab.rep.fail = True
    with pytest.raises(NotAcknowledged):
        actions.perform(lab.d, "rotate-cert")
    assert not [e for e in lab.events.log if e[0] == "add"]  # no agent was told
    intent = lab.intent()
    assert intent is not None and intent.state == "announcing"
    assert lab.state().unfinished and lab.installed() == lab.old
    with pytest.raises(NotAcknowledged):  # still not acknowledged: the recovery waits too
        rotation_intent.recover(lab.d)
    assert not [e for e in lab.events.log if e[0] == "add"]
    lab.rep.fail = False
    out = rotation_intent.recover(lab.d)
    assert out is not None and out["outcome"] == "completed"
    assert lab.installed() == intent.new_serial and lab.intent() is None


def test_leader_killed_after_telling_new_leader_finishes(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    kill_after_telling(lab, monkeypatch)
    intent = lab.intent()
    assert intent is not None and lab.installed() == lab.old and lab.state().unfinished
    new = serial_to_hex(intent.new_serial)
    assert all(new in m for m in lab.agents.maps.values())  # the agents were told
    out = rotation_intent.recover(lab.d)  # the new leader's start-up (it holds the pair)
    assert out is not None and out["outcome"] == "completed"
    assert lab.installed() == intent.new_serial and not lab.state().unfinished
    assert lab.intent() is None
    assert rotation_intent.recover(lab.d) is None  # nothing left
    # then the ordinary retirement removes the old serial: only the new one stays
    res = asyncio.run(rotation.retire(lab.d, force=True))
    assert res["retired"] is True
    assert all(m == {new} for m in lab.agents.maps.values())


def test_new_leader_without_the_pair_retires_the_orphan_serial(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p: Path(p).read_bytes() for p in (lab.cfg.cert, lab.cfg.key)}
    reg_before = {r["hostname"]: r["dispatcher_serial"] for r in lab.d.registry.all()}
    kill_after_telling(lab, monkeypatch)
    intent = lab.intent()
    assert intent is not None
    orphan = serial_to_hex(intent.new_serial)
    # the new leader never got the intent's files (sync_ack = none): its rotation.json is
    # gone, no .next pair; only the etcd record tells what happened
    for suffix in (".next", ".prev"):
        Path(lab.cfg.cert + suffix).unlink()
        Path(lab.cfg.key + suffix).unlink()
    Path(lab.cfg.rotation_file).unlink()
    lab.agents.down = {"web3"}
    out = rotation_intent.recover(lab.d)
    assert out is not None and out["outcome"] == "retiring"
    assert out["failed"] == [{"host": "web3", "error": "connection refused"}]
    again = lab.intent()
    assert again is not None and again.state == "retiring"  # remembered for the retry
    assert orphan not in lab.agents.maps["web1"] and orphan in lab.agents.maps["web3"]
    lab.agents.down = set()
    out = rotation_intent.recover(lab.d)
    assert out is not None and out["outcome"] == "retired" and lab.intent() is None
    # no orphan survives; the installed pair is the one the cluster had
    assert all(m == {serial_to_hex(lab.old)} for m in lab.agents.maps.values())
    assert {p: Path(p).read_bytes() for p in before} == before
    assert {r["hostname"]: r["dispatcher_serial"] for r in lab.d.registry.all()} == reg_before
    assert rotation_intent.recover(lab.d) is None


def test_local_unfinished_state_without_pair_is_undone_too(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    kill_after_telling(lab, monkeypatch)
    intent = lab.intent()
    assert intent is not None
    key = rotation_intent.intent_key(lab.backend)
    lab.elector.commit("test-corrupt", puts={key: "not json"})  # a corrupt record: ignored
    Path(lab.cfg.cert + ".next").unlink()
    out = rotation_intent.recover(lab.d)  # rotation.json says announcing, the pair is gone
    assert out is not None and out["outcome"] == "retired"
    state = lab.state()
    assert not state.unfinished and state.current_serial == lab.old
    assert state.extra["orphan_retired"] == intent.new_serial
    assert all(m == {serial_to_hex(lab.old)} for m in lab.agents.maps.values())


def test_phase_round_trips_and_is_absent_once_finished() -> None:
    s = rs.RotationState.new("b2", "a1", 30, 1_800_000_000.0).announcing()
    doc = s.to_json()
    assert doc["phase"] == "announcing" and rs.RotationState.from_json(doc).unfinished
    assert "phase" not in s.finished().to_json()
    assert not rs.RotationState.from_json({"current_serial": "b2"}).unfinished  # upstream file
    with pytest.raises(ValueError):
        rs.RotationState.from_json({"current_serial": "b2", "phase": 3})


def test_a_second_rotation_never_cuts_off_an_agent_that_missed_the_first(lab: Lab) -> None:
    """An agent down during a rotation trusts only the old serial. A second rotation would
    drop the pair it trusts: it is told first (with the kept pair), and while it cannot be
    told the second rotation is refused, with its name."""
    down = AGENTS[0]
    lab.agents.down.add(down)
    first = actions.perform(lab.d, "rotate-cert").data["new_serial"]
    assert serial_to_hex(first) not in lab.agents.maps[down]
    with pytest.raises(rotation.RotationError) as refused:
        actions.perform(lab.d, "rotate-cert")
    assert down in str(refused.value) and "would cut them off" in str(refused.value)
    assert lab.installed() == serial_to_hex(first)  # nothing changed
    lab.agents.down.clear()  # it is back: the second rotation tells it first, then rotates
    second = actions.perform(lab.d, "rotate-cert").data["new_serial"]
    assert serial_to_hex(second) in lab.agents.maps[down]
    assert all(serial_to_hex(second) in m for m in lab.agents.maps.values())
