"""Dispatcher cert rotation in a cluster: intent first, finished or undone by any leader.

A leader killed in the middle of a rotation must not leave agents trusting a serial nobody
holds the key of (an *orphan*). So ``rotate-cert`` runs in two fenced operations:

1. ``cert-rotate-intent``: :func:`dispatcher.pki.rotation.prepare` stages the new pair
   (``<cert>.next``/``<key>.next``, the old one kept as ``.prev``) and writes
   ``rotation.json`` with ``phase = announcing``; the intent (new serial, old serial) is
   committed in etcd under ``/<cluster>/rotation-intent`` in the same epoch. Then the
   generation carrying the files is acknowledged by replication (``sync_ack``): a majority
   of members holds the new key pair **before any agent is told**.
2. ``cert-rotate``: :func:`dispatcher.pki.rotation.finish` broadcasts the new serial with
   the old credentials, installs the pair, drops ``phase``; the etcd intent is deleted in
   the same epoch; the generation is acknowledged.

A new leader (its leader-work start-up, and every :data:`RECHECK` s while an intent
remains) calls :func:`recover`: an intent in etcd or an ``announcing`` ``rotation.json``
is finished when this instance holds the pair (it caught up with the acknowledged
generation), otherwise the orphan serial is removed from every registered agent
(``/rotate-serial`` ``remove``, which upstream agents accept; an absent serial is a no-op)
with the installed credentials; the etcd intent stays (``state = retiring``) until every
agent answered, so an agent that was down is retried. The etcd record holds no key
material: it is what survives when the files did not replicate (``sync_ack = none``, or
every member that applied the generation lost too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from agent.common import logfmt
from agent.common.serial import serial_to_hex
from dispatcher.pki import rotation
from dispatcher.pki import rotation_state as rs

if TYPE_CHECKING:
    from cluster.backend import Backend
    from dispatcher.core import Dispatcher
    from dispatcher.ha.writer import FencedWriter

ev = logfmt.event
RECHECK = 10.0  # seconds between two recovery attempts while an intent remains
_rotating = threading.Lock()  # one rotation or recovery at a time in this process


@dataclass(frozen=True)
class Intent:
    new_serial: str
    old_serial: str
    state: str  # "announcing" (recorded, maybe told), "retiring" (orphan being removed)
    epoch: int
    leader: str
    at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Intent:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("rotation intent is not an object")
        new, old = d.get("new_serial"), d.get("old_serial")
        if not isinstance(new, str) or not serial_to_hex(new) or not isinstance(old, str):
            raise ValueError("rotation intent lacks its serials")
        return cls(new, old, str(d.get("state") or "announcing"), int(d.get("epoch") or 0),
                   str(d.get("leader") or ""), float(d.get("at") or 0.0))  # fmt: skip


def intent_key(backend: Backend) -> str:
    return f"{backend.keys.prefix}rotation-intent"


def read(backend: Backend) -> Intent | None:
    """The recorded intent; None if there is none or it is malformed (logged)."""
    key = intent_key(backend)
    raw = backend.get_value(key)
    if raw is None:
        return None
    try:
        return Intent.from_json(raw)
    except (ValueError, TypeError) as exc:
        ev("rotation-intent-corrupt", logging.ERROR, key=key, error=exc)
        return None


def _writer(d: Dispatcher) -> FencedWriter:
    from dispatcher.ha.writer import FencedWriter

    writer = d.writer
    if not isinstance(writer, FencedWriter):
        raise TypeError("a cluster rotation needs the fenced writer")
    return writer


def _acknowledge(d: Dispatcher, before: int) -> int | None:
    """Acknowledged under the epoch the operation just ended under (-1 when this instance
    leads no more: refused at once)."""
    from dispatcher.ha.writer import FencedWriter

    rep = d.replication
    if rep is None:
        return None
    if not isinstance(d.writer, FencedWriter):
        return rep.acknowledge(before)
    epoch = d.writer.epoch()
    return rep.acknowledge(before, epoch if epoch is not None else -1)


def _generation(d: Dispatcher) -> int:
    return d.replication.generation if d.replication is not None else 0


def rotate(d: Dispatcher, now: float | None = None) -> dict[str, Any]:
    """``rotate-cert`` on the leader of a cluster (the module docstring's two steps)."""
    now = time.time() if now is None else now
    writer = _writer(d)
    elector = writer.elector
    key = intent_key(elector.backend)
    with _rotating:
        before = _generation(d)
        with writer.operation("cert-rotate-intent") as epoch:
            state, pending = asyncio.run(rotation.prepare(d, now))
            intent = Intent(state.current_serial, state.previous_serial or "", "announcing",
                            epoch, elector.instance_id, now)  # fmt: skip
            elector.commit("rotation-intent", puts={key: intent.to_json()}, epoch=epoch,
                           detail={"new_serial": intent.new_serial,
                                   "old_serial": intent.old_serial})  # fmt: skip
        acked = _acknowledge(d, before)  # NotAcknowledged: nobody is told; recover() acts
        ev("rotation-intent", new_serial=intent.new_serial, old_serial=intent.old_serial,
           generation=acked, epoch=epoch)  # fmt: skip
        rotation.pause_point("rotation-intent")
        before = _generation(d)
        with writer.operation("cert-rotate") as epoch2:
            report = asyncio.run(rotation.finish(d, state, now))
            elector.commit("rotation-done", deletes=[key], epoch=epoch2,
                           detail={"serial": intent.new_serial})  # fmt: skip
        generation = _acknowledge(d, before)
    return {**rotation.result(state, pending, report), "generation": generation}


def pending(d: Dispatcher) -> bool:
    """Whether an unfinished rotation is recorded (etcd intent or local ``announcing``)."""
    state = rs.load(d.cfg.rotation_file)
    if state is not None and state.unfinished:
        return True
    return read(_writer(d).elector.backend) is not None


def recover(d: Dispatcher, now: float | None = None) -> dict[str, Any] | None:
    """Finish or undo an unfinished rotation on the leader; None when there is none (or a
    rotation runs right now). ``{outcome, serial, ...}``; ``outcome`` is ``completed``,
    ``retired``, ``retiring`` (some agents not reached yet: retried) or ``finished``.

    Before finishing, the files holding the intent are acknowledged by replication again
    (a forced generation): no agent is told of a serial whose key pair only this instance
    holds. :class:`~dispatcher.ha.replication.NotAcknowledged` leaves it for the next try.
    """
    now = time.time() if now is None else now
    writer = _writer(d)
    elector = writer.elector
    key = intent_key(elector.backend)
    if not _rotating.acquire(blocking=False):
        return None
    try:
        intent = read(elector.backend)
        state = rs.load(d.cfg.rotation_file)
        if intent is not None:
            serial, old = intent.new_serial, intent.old_serial
        elif state is not None and state.unfinished:
            serial, old = state.current_serial, state.previous_serial or ""
        else:
            return None
        same = state is not None and serial_to_hex(state.current_serial) == serial_to_hex(serial)
        complete = (
            same and state is not None and state.unfinished and rotation.has_material(d, state)
        )
        if complete:
            _acknowledge(d, _generation(d))
        before = _generation(d)
        out: dict[str, Any]
        with writer.operation("cert-rotate-recover") as epoch:
            if complete and state is not None:
                report = asyncio.run(rotation.finish(d, state, now, pause=False))
                out = {"outcome": "completed", "serial": serial, **report}
            elif (
                same
                and state is not None
                and not state.unfinished
                and serial_to_hex(rotation.installed_serial(d) or "") == serial_to_hex(serial)
            ):
                out = {"outcome": "finished", "serial": serial}  # only the etcd delete was lost
            else:
                res = asyncio.run(rotation.retire_orphan(d, serial, now))
                out = {"outcome": "retiring" if res["failed"] else "retired", **res}
            if out["outcome"] == "retiring":  # remembered in etcd until every agent answered
                if intent is None or intent.state != "retiring":
                    again = Intent(serial, old, "retiring", epoch, elector.instance_id,
                                   intent.at if intent is not None else now)  # fmt: skip
                    elector.commit("rotation-intent", puts={key: again.to_json()},
                                   epoch=epoch, detail={"state": "retiring"})  # fmt: skip
            elif intent is not None:
                elector.commit("rotation-done", deletes=[key], epoch=epoch,
                               detail={"serial": serial, "outcome": out["outcome"]})  # fmt: skip
        _acknowledge(d, before)
        level = logging.WARNING if out["outcome"] == "retiring" else logging.INFO
        ev("rotation-recover", level, outcome=out["outcome"], serial=serial, epoch=epoch,
           failed=len(out.get("failed") or []))  # fmt: skip
        return out
    finally:
        _rotating.release()


def _members_behind(d: Dispatcher) -> str:
    """Members that did not apply the current generation or must still restart to load
    their certificate files ("" when none)."""
    rep = d.replication
    members = getattr(rep, "members", None)
    if rep is None or members is None:
        return ""
    gen = rep.generation
    behind = [m.instance_id for m in members()
              if m.generation < gen or m.restart_pending or m.state != "serving"]  # fmt: skip
    return ", ".join(sorted(behind))


def rotate_ca(d: Dispatcher, finish: bool = False) -> dict[str, Any]:
    """``rotate-ca`` on the leader of a cluster: the intent (new CA, ``ca-rotation.json``)
    is recorded and acknowledged before any agent is told; then each phase of
    :mod:`dispatcher.pki.carotation` runs in its own fenced operation, acknowledged; the
    dispatcher cert is reissued under the new CA by the intent-first :func:`rotate`."""
    from dispatcher.pki import carotation

    writer = _writer(d)
    before = _generation(d)
    with writer.operation("ca-rotate-intent"):
        carotation.record(d)
    generation = _acknowledge(d, before)
    for _ in range(len(carotation.PHASES)):
        st = carotation.load(d)
        if st is None:
            break
        phase = st.phase
        if phase in ("dispatcher", "drop") and (waiting := _members_behind(d)):
            # members still verify peers with the CA file they loaded at start: a new-CA
            # dispatcher cert (or dropping the old CA) before they reloaded the bundle
            # would cut them off from the leader's files; run again once they restarted
            ev("ca-rotation-wait", phase=phase, waiting=waiting)
            return {**carotation.status(d), "generation": generation,
                    "waiting": f"members not yet running the CA bundle: {waiting}"}  # fmt: skip
        if phase == "dispatcher":
            rotate(d)  # takes _rotating itself
            before = _generation(d)
            with writer.operation("ca-rotate"):
                carotation.dispatcher_rotated(d)
            generation = _acknowledge(d, before)
        else:
            before = _generation(d)
            with writer.operation("ca-rotate"):
                asyncio.run(carotation.step(d, finish))
            generation = _acknowledge(d, before)
        after = carotation.load(d)
        if after is None or after.phase == phase:
            break
    return {**carotation.status(d), "generation": generation}
