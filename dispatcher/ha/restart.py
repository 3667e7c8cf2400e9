"""Rolling restarts after a generation that changed certificates (DESIGN.md section 3).

Level-triggered: every member reports ``restart_pending`` in its member key while the
certificate, key or CA files on disk differ from what its process loaded (a process
presents what it loaded). The leader's :class:`RestartCoordinator` restarts them one at a
time:

1. it orders the first pending follower that runs the current generation: a fenced put of
   ``/<cluster>/orders/<instance_id>`` with its epoch and the generation;
2. the follower (:func:`check_order`, on its monitor thread) refuses an order from an
   epoch older than the newest it has seen; otherwise it drains (``/ready`` 503, or 404
   with ``?drain=404`` so HAProxy stops sending new connections while established ones
   finish; every API response says ``Connection: close``), waits ``drain_wait``, lets
   in-flight requests finish and re-executes itself, so it loads the new files;
3. the leader waits until that member is back: member key ``serving``, not pending, on
   the generation, and its ``/ready`` answers 200, then ``drain_wait`` more so the load
   balancer has seen it up; it deletes the order and goes on with the next member;
   Orders are sealed with the cluster key (:mod:`dispatcher.ha.records`): an order
   that fails verification is logged once, counted and deleted, never acted on;
4. when only the leader is left pending it hands over (resigns; a peer that already
   restarted takes over and restarts it like any follower). Alone, it restarts itself.

A member that does not come back within :attr:`RestartCoordinator.TIMEOUT` is skipped
for that generation (logged ``restart-timeout``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent.common import logfmt
from cluster.backend import KVBackend, MemberInfo
from cluster.election import Elector, EpochGuard
from cluster.errors import BackendUnavailable, Fenced, NotLeader
from dispatcher.ha import peer
from dispatcher.ha.records import ORDER
from dispatcher.ha.sync import Syncer

ev = logfmt.event


class RestartCoordinator:
    PERIOD = 0.25
    TIMEOUT = 90.0

    def __init__(
        self,
        backend: KVBackend,
        elector: Elector,
        syncer: Syncer,
        members: Callable[[bool], list[MemberInfo]],
        restart_self: Callable[[str], None],
        *,
        busy: Callable[[], bool] = lambda: False,
        paused: Callable[[], bool] = lambda: False,
        settle: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.elector = elector
        self.syncer = syncer
        self.members = members
        self.restart_self = restart_self
        self.busy = busy
        self.settle = settle
        self.paused = paused
        self.me = elector.instance_id
        self._clock = clock
        self._epoch: int | None = None
        self._target: dict[str, Any] | None = None
        self._healthy_since: float | None = None
        self._skipped: dict[str, int] = {}
        self._self_ordered = False
        self._handed_over_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ha-restart", daemon=True)

    def start(self) -> RestartCoordinator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.PERIOD):
            try:
                self.step()
            except BackendUnavailable:
                pass  # the monitor reports the store's state
            except (NotLeader, Fenced) as exc:
                ev("restart-order", logging.WARNING, result="fenced", error=exc)
            except Exception as exc:
                ev("restart-error", logging.ERROR, error=f"{type(exc).__name__}: {exc}")

    @property
    def target(self) -> str | None:
        t = self._target
        return str(t["instance"]) if t else None

    def step(self) -> None:
        epoch = self.elector.epoch
        if epoch is None:
            self._epoch, self._target = None, None
            return
        if epoch != self._epoch:
            self._epoch, self._target, self._self_ordered = epoch, None, False
            self._clean_orders(epoch)
        if self._target is None and self.paused():
            return  # maintenance mode: no new restart (one in progress finishes)
        if not self.syncer.published_current():
            return  # changes not yet published: the followers cannot have them yet
        gen = self.syncer.generation
        members = {m.instance_id: m for m in self.members(True)}
        now = self._clock()
        if self._target is not None:
            self._watch_target(members, epoch, now)
            return
        pending = sorted(
            (m for m in members.values()
             if m.instance_id != self.me and m.restart_pending and m.state == "serving"
             and m.generation >= gen and self._skipped.get(m.instance_id) != gen),
            key=lambda m: m.instance_id,
        )  # fmt: skip
        if pending:
            self._order(pending[0], epoch, gen, now)
            return
        if not self.syncer.restart_pending():
            return
        others = [m for m in members.values() if m.instance_id != self.me]
        if any(m.restart_pending and self._skipped.get(m.instance_id) != gen for m in others):
            return  # a follower still has to sync or restart: the leader goes last
        ready = [m for m in others if m.state == "serving" and m.generation >= gen]
        if ready and not self.busy():  # never hand over in the middle of a request
            if now - self._handed_over_at > 10:
                self._handed_over_at = now
                ev("restart-handover", instance=self.me, epoch=epoch, generation=gen,
                   to=",".join(sorted(m.instance_id for m in ready)))  # fmt: skip
                self.elector.resign(reason="rolling restart: the leader goes last")
            return
        if not others and not self._self_ordered:
            self._self_ordered = True
            ev("restart-self", instance=self.me, epoch=epoch, generation=gen,
               reason="no other member to hand over to")  # fmt: skip
            self.restart_self(f"restart of the only member, generation {gen}")

    def _order(self, m: MemberInfo, epoch: int, gen: int, now: float) -> None:
        order_id = uuid.uuid4().hex
        doc = {"order": "restart", "id": order_id, "epoch": epoch, "generation": gen,
               "leader": self.me, "at": time.time()}  # fmt: skip
        key = self.backend.keys.order(m.instance_id)
        self.elector.commit(
            "restart-order", puts={key: self.syncer.records.seal(ORDER, key, doc)},
            detail={"instance": m.instance_id, "generation": gen}, epoch=epoch,
        )  # fmt: skip
        self._target = {"instance": m.instance_id, "generation": gen, "id": order_id,
                        "deadline": now + self.TIMEOUT, "at": now}  # fmt: skip
        self._healthy_since = None
        ev("restart-order", instance=m.instance_id, generation=gen, epoch=epoch, order=order_id)

    def _watch_target(self, members: dict[str, MemberInfo], epoch: int, now: float) -> None:
        t = self._target
        assert t is not None
        m = members.get(t["instance"])
        back = (
            m is not None and m.state == "serving" and not m.restart_pending
            and m.generation >= t["generation"]
            and peer.health_ok(m.advertise_url, m.health_port, "/ready")
        )  # fmt: skip
        if back:
            if self._healthy_since is None:
                self._healthy_since = now
            if now - self._healthy_since >= self.settle:
                self._finish(epoch, "done", took=round(now - t["at"], 2),
                             cert_serial=m.cert_serial if m else "")  # fmt: skip
            return
        self._healthy_since = None
        if now > t["deadline"]:
            self._skipped[t["instance"]] = t["generation"]
            self._finish(epoch, "timeout", level=logging.WARNING)

    def _finish(self, epoch: int, result: str, level: int = logging.INFO, **detail: Any) -> None:
        t = self._target
        assert t is not None
        self._target = None
        ev("restart-" + result, level, instance=t["instance"], generation=t["generation"],
           epoch=epoch, **detail)  # fmt: skip
        key = self.backend.keys.order(t["instance"])
        self.elector.commit("restart-order-done", deletes=[key], epoch=epoch,
                            detail={"instance": t["instance"], "result": result})  # fmt: skip

    def _clean_orders(self, epoch: int) -> None:
        """A new leader deletes the orders of older epochs (the old leader's campaign)."""
        stale = []
        for kv in self.backend.get_prefix(self.backend.keys.orders):
            doc = self.syncer.records.open_dict(ORDER, kv.key, kv.value)  # forged: deleted
            try:
                e = int(doc.get("epoch", 0)) if doc is not None else 0
            except (ValueError, TypeError):
                e = 0
            if e < epoch:
                stale.append(kv.key)
        if stale:
            self.elector.commit("restart-orders-clean", deletes=stale, epoch=epoch,
                                detail={"deleted": len(stale)})  # fmt: skip


class OrderWatcher:
    """Follower side: act on ``/<cluster>/orders/<me>`` (called by the monitor)."""

    def __init__(
        self,
        backend: KVBackend,
        instance_id: str,
        guard: EpochGuard,
        syncer: Syncer,
        leading: Callable[[], bool],
    ) -> None:
        self.backend = backend
        self.me = instance_id
        self.guard = guard
        self.syncer = syncer
        self.leading = leading
        self.on_restart: Callable[[str], None] | None = None
        self._handled: set[str] = set()

    def check(self) -> None:
        key = self.backend.keys.order(self.me)
        raw = self.backend.get_value(key)
        if raw is None:
            return
        doc = self.syncer.records.open_dict(ORDER, key, raw)
        if doc is None:  # not sealed by a leader: logged once and counted; deleted
            self.backend.delete_value(key)
            return
        try:
            order_id, epoch, gen = str(doc["id"]), int(doc["epoch"]), int(doc["generation"])
        except (ValueError, KeyError, TypeError):
            ev("order-refused", logging.WARNING, instance=self.me, reason="malformed order")
            self.backend.delete_value(key)
            return
        if order_id in self._handled:
            return
        newest = self.guard.newest
        if epoch < newest:
            self._handled.add(order_id)
            ev("order-refused", logging.WARNING, instance=self.me, order=order_id, epoch=epoch,
               newest_epoch=newest, reason="order from an epoch older than the newest seen")  # fmt: skip
            self.backend.delete_value(key)
            return
        if self.leading():
            return  # a leader is never ordered; it hands over first
        if not self.syncer.restart_pending():
            self._handled.add(order_id)
            ev("order-done", instance=self.me, order=order_id, epoch=epoch,
               reason="already running the current certificates")  # fmt: skip
            return
        if self.syncer.generation < gen:
            return  # not synced yet: look again next round
        self._handled.add(order_id)
        ev("restart-ordered", instance=self.me, order=order_id, epoch=epoch, generation=gen,
           leader=doc.get("leader", ""))  # fmt: skip
        if self.on_restart is not None:
            self.on_restart(f"ordered by {doc.get('leader', '?')} (epoch {epoch}, "
                            f"generation {gen})")  # fmt: skip
