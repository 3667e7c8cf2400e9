"""Leader-only background work of an instance: requests, retirement, maintenance.

One thread, active only while this instance leads:

* requests from ``ced`` (:mod:`dispatcher.ha.leader_requests`): every leader-only action
  of :mod:`dispatcher.ha.actions`, each under a fenced operation;
* after a rotation, retirement of the previous serial (:func:`dispatcher.pki.rotation.retire`)
  as soon as every live member presents the new serial (and every agent acknowledged it,
  or the overlap is over): every second for ten minutes after the rotation, then every
  minute;
* after a rotation, the broadcast of the new serial again to the agents that have not
  acknowledged it (unreachable during the rotation, or the rotation was cut short): every
  ten seconds for ten minutes after the rotation, then every minute, until retirement.
  Each round runs on its own thread (one at a time, each agent given a few seconds), so
  agents that do not answer never hold up the requests above; retirement waits for it;
* at start-up (once caught up) and every ten seconds while one remains: an unfinished
  rotation left by a previous leader is finished or its orphan serial retired
  (:func:`dispatcher.ha.rotation_intent.recover`);
* ``maintain`` (ping with agent renewals, rotation check, broadcast, stale expiry,
  retirement, run purge) every ``cert_check_interval`` seconds (0: never).

Followers never sign: signing happens in these operations, the pairing approvals and the
renewals, all of which run on the leader only (and ``dispatcher.pki.ca`` refuses to sign on
an instance that does not lead).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from agent.common import logfmt
from cluster.errors import BackendUnavailable, Fenced, NotLeader
from cluster.signing import RecordRejected
from dispatcher.ha import actions, leader_requests
from dispatcher.ha.records import RESULT
from dispatcher.reqid import REQID_RE

if TYPE_CHECKING:
    from dispatcher.core import Dispatcher
    from dispatcher.ha.node import HANode

ev = logfmt.event
# actions that change or tell the serials: one at a time with a rebroadcast round
SERIAL_ACTIONS = frozenset({"rotate-cert", "rotate-ca", "broadcast", "maintain", "setup-ca",
                            "setup-ctrl-exec"})  # fmt: skip
REQUEST_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]{0,127}")  # what post() makes, bounded
T = TypeVar("T")


class LeaderWork:
    PERIOD = 0.1

    def __init__(self, node: HANode, d: Dispatcher,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.node = node
        self.d = d
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ha-leader-work", daemon=True)
        self._epoch: int | None = None
        self._next_retire = 0.0
        self._next_broadcast = 0.0
        self._next_maintain = 0.0
        self._next_prune = 0.0
        self._next_recover = 0.0
        self.busy = False  # carrying out a request or a maintenance run right now
        self._round: threading.Thread | None = None  # a rebroadcast round in progress
        self._serials = threading.Lock()  # held by a round and by SERIAL_ACTIONS
        self.rejected = 0  # request records dropped as malformed
        self._dropped: set[str] = set()  # their keys, each logged once
        self._done: dict[str, float] = {}  # request ids carried out (replays are refused)

    def start(self) -> LeaderWork:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)
        if self._round is not None:  # a round gives each agent a few seconds at most
            self._round.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.PERIOD):
            epoch = self.node.elector.epoch
            if epoch is None:
                self._epoch = None
                continue
            now = self._clock()
            if epoch != self._epoch:
                self._epoch = epoch
                interval = self.d.cfg.cert_check_interval
                self._next_maintain = now + interval if interval > 0 else float("inf")
                self._next_retire = now + 1.0
                self._next_recover = now  # start-up: a predecessor's unfinished rotation
            sync = self.node.sync
            if sync is not None and sync.gate_reason() is not None:
                continue  # catching up: no leader-only work yet
            try:
                self._requests(epoch)
                if self.node.paused is not None:
                    continue  # maintenance mode: operator requests only
                if now >= self._next_recover:
                    self._recover_check(now)
                if now >= self._next_retire:
                    self._retire_check(now)
                if now >= self._next_maintain:
                    self._next_maintain = now + max(60, self.d.cfg.cert_check_interval)
                    self._serial_work(lambda: actions.perform(self.d, "maintain"))
                if now >= self._next_prune:
                    self._next_prune = now + 60
                    self._prune_results(epoch)
            except BackendUnavailable as exc:
                self.node.health.mark_failed(exc)
            except (NotLeader, Fenced) as exc:
                ev("leader-work", logging.WARNING, epoch=epoch, error=exc)
            except Exception as exc:
                ev("leader-work", logging.ERROR, epoch=epoch, error=f"{type(exc).__name__}: {exc}")

    # -- requests ------------------------------------------------------------------------

    def _requests(self, epoch: int) -> None:
        """Carry out every queued request, each on its own: a record that does not parse
        (or names no valid id) is dropped and logged once, never stops the others."""
        backend = self.node.data
        records = self.node.records
        for kv in backend.get_prefix(backend.keys.requests):
            rid = kv.key[len(backend.keys.requests) :]
            if not REQUEST_ID.fullmatch(rid):
                self._drop(kv.key, epoch, "bad request id")
                continue
            try:
                doc = records.signer.open(leader_requests.REQUEST, kv.key, kv.value)
            except RecordRejected as exc:  # not sealed by a dispatcher host: never acted on
                records.rejections.note(exc, lambda _exc: None)  # counted; logged below
                self._drop(kv.key, epoch, exc.reason)
                continue
            try:
                kind, args = str(doc["kind"]), doc.get("args") or {}
                if doc.get("id") != rid or not isinstance(args, dict):
                    raise ValueError("bad request id or arguments")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self._drop(kv.key, epoch, f"malformed: {exc}")
                continue
            if not leader_requests.fresh(doc) or rid in self._done:
                self._drop(kv.key, epoch, "expired or replayed request")
                continue
            self._remember(rid)
            asker = doc.get("reqid")  # the asking ced's reqid: one grep joins both logs
            ours = isinstance(asker, str) and REQID_RE.fullmatch(asker) is not None
            with logfmt.context(**({"reqid": asker} if ours else {})):
                self._request(epoch, rid, kind, args, str(doc.get("requested_by", "")))

    def _remember(self, rid: str) -> None:
        """Request ids carried out recently: a sealed request replayed is refused."""
        now = time.monotonic()
        if len(self._done) >= 10000:  # bounded: older than a request can live go first
            self._done = {k: t for k, t in self._done.items()
                          if now - t < leader_requests.REQUEST_TTL + 30}  # fmt: skip
        self._done[rid] = now

    def _drop(self, key: str, epoch: int, reason: str) -> None:
        self.rejected += 1
        if key not in self._dropped:
            if len(self._dropped) >= 1000:  # junk keys written in bulk: bounded memory
                self._dropped.clear()
            self._dropped.add(key)
            ev("request-drop", logging.WARNING, key=key, reason=reason, epoch=epoch)
        self.node.elector.commit("request-drop", deletes=[key], epoch=epoch,
                                 detail={"key": key, "reason": "refused"})  # fmt: skip

    def _request(self, epoch: int, rid: str, kind: str, args: dict[str, Any], by: str) -> None:
        keys = self.node.data.keys
        seal = self.node.records.seal
        running = {"state": "running", "id": rid, "kind": kind, "epoch": epoch,
                   "leader": self.node.instance_id, "at": time.time()}  # fmt: skip
        self.node.elector.commit(
            "request-claim", puts={keys.result(rid): seal(RESULT, keys.result(rid), running)},
            deletes=[keys.request(rid)], epoch=epoch, detail={"id": rid, "kind": kind},
        )  # fmt: skip
        ev("leader-request", id=rid, kind=kind, epoch=epoch, requested_by=by)
        t0 = self._clock()
        done: dict[str, Any] = {**running, "state": "done"}
        self.busy = True
        try:
            try:
                done.update(ok=True, **self.execute(kind, args))
            except Exception as exc:
                done.update(ok=False, error=str(exc) or type(exc).__name__,
                            error_type=type(exc).__name__)  # fmt: skip
            done["seconds"] = round(self._clock() - t0, 3)
            self.node.elector.commit(
                "request-done",
                puts={keys.result(rid): seal(RESULT, keys.result(rid),
                                             json.loads(json.dumps(done, default=str)))},
                epoch=epoch, detail={"id": rid, "kind": kind, "ok": done["ok"]},
            )  # fmt: skip
        finally:
            self.busy = False

    def _serial_work(self, fn: Callable[[], T]) -> T:
        """``fn`` once no rebroadcast round is in progress (it changes or tells serials)."""
        with self._serials:
            return self._busy(fn)

    def _busy(self, fn: Callable[[], T]) -> T:
        was, self.busy = self.busy, True
        try:
            return fn()
        finally:
            self.busy = was

    def execute(self, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        """Carry out one request through :func:`dispatcher.ha.actions.perform`: the
        action's document plus the generation carrying the change."""
        if kind in SERIAL_ACTIONS:
            res = self._serial_work(lambda: actions.perform(self.d, kind, args))
        else:
            res = actions.perform(self.d, kind, args)
        self._next_retire = min(self._next_retire, self._clock() + 1.0)
        return {"result": res.data, "generation": res.generation}

    # -- an unfinished rotation ------------------------------------------------------------

    def _recover_check(self, now: float) -> None:
        from dispatcher.ha import rotation_intent

        self._next_recover = now + rotation_intent.RECHECK
        res = self._serial_work(lambda: rotation_intent.recover(self.d))
        if res is not None and res.get("outcome") != "retiring":
            self._next_retire = min(self._next_retire, now + 1.0)

    # -- retirement ----------------------------------------------------------------------

    def converged(self, serial: str) -> str | None:
        """None when every live member presents ``serial``, else who does not yet."""
        from agent.common.serial import serial_to_hex

        want = serial_to_hex(serial)
        restarts = self.node.restarts
        if restarts is not None and restarts.target is not None:
            return f"the restart of {restarts.target} is in progress"
        sync = self.node.sync
        gen = sync.generation if sync is not None else 0
        behind = [m.instance_id for m in self.node.members(fresh=True)
                  if serial_to_hex(m.cert_serial) != want or m.restart_pending
                  or m.generation < gen or m.state != "serving"]  # fmt: skip
        if behind:
            return f"members not yet presenting {serial}: {', '.join(sorted(behind))}"
        return None

    def _retire_check(self, now: float) -> None:
        from dispatcher.pki import rotation
        from dispatcher.pki import rotation_state as rs

        state = rs.load(self.d.cfg.rotation_file)
        if state is None or not state.previous_serial:
            self._next_retire = now + 5.0
            return
        rotated = rs.parse_iso(state.rotated_at) or 0.0
        recent = time.time() - rotated < 600
        self._next_retire = now + (1.0 if recent else 60.0)
        if now >= self._next_broadcast:
            self._next_broadcast = now + (10.0 if recent else 60.0)
            self._broadcast_check(rotation, state)
        if self.rebroadcasting() or self.converged(state.current_serial) is not None:
            return
        res = self._serial_work(lambda: self._retire(rotation))
        if res.get("retired"):
            ev("serial-retired-ha", serial=res.get("serial"), reason=res.get("reason"),
               removed=len(res.get("removed") or []), instance=self.node.instance_id)  # fmt: skip

    def rebroadcasting(self) -> bool:
        """A rebroadcast round is in progress."""
        return self._round is not None and self._round.is_alive()

    def _broadcast_check(self, rotation: Any, state: Any) -> None:
        """Tell the agents still behind the current serial again (with the previous
        credentials they trust); an agent that answers becomes reachable with the new. The
        round runs on its own thread: this one goes on serving requests meanwhile."""
        if self.rebroadcasting():
            return
        if state.unfinished or not rotation.unacknowledged(self.d, state):
            return
        self._round = threading.Thread(target=self._broadcast_round, name="ha-rebroadcast",
                                       daemon=True)  # fmt: skip
        self._round.start()

    def _broadcast_round(self) -> None:
        try:
            with self._serials:
                res = actions.perform(self.d, "broadcast")
        except Exception as exc:  # fenced, not leading, etcd away: the next round retries
            ev("serial-rebroadcast", logging.WARNING, result="failed",
               error=f"{type(exc).__name__}: {exc}", instance=self.node.instance_id)  # fmt: skip
            return
        data = res.data if isinstance(res.data, dict) else {}
        if data.get("updated"):
            ev("serial-rebroadcast", serial=data.get("serial"),
               updated=len(data.get("updated") or []), failed=len(data.get("failed") or []),
               instance=self.node.instance_id)  # fmt: skip

    def _retire(self, rotation: Any) -> dict[str, Any]:
        with self.node.writer.operation("serial-retire"):
            out: dict[str, Any] = asyncio.run(rotation.retire(self.d))
            return out

    def _prune_results(self, epoch: int) -> None:
        backend = self.node.data
        old = []
        for kv in backend.get_prefix(backend.keys.results):
            doc = self.node.records.open_dict(RESULT, kv.key, kv.value)  # forged: pruned
            try:
                at = float(doc.get("at", 0)) if doc is not None else 0.0
            except (ValueError, TypeError):
                at = 0.0
            if time.time() - at > leader_requests.RESULT_KEEP:
                old.append(kv.key)
        if old:
            self.node.elector.commit("results-prune", deletes=old[:100], epoch=epoch,
                                     detail={"deleted": len(old[:100])})  # fmt: skip
