""":class:`HANode`: one instance's membership in the cluster, built from its config.

It owns the coordination backend (etcd when ``etcd_endpoints`` is set, else the embedded
local backend in ``state_dir``), the :class:`~cluster.election.Elector`, the member
:class:`~cluster.session.Session`, and what the dispatcher plugs in: the health-port
:class:`~dispatcher.ha.role.ClusterRole`, the :class:`~dispatcher.ha.writer.FencedWriter`,
the :class:`~dispatcher.ha.runlocks.HARunLocks` and (with etcd) the
:class:`~dispatcher.ha.runs.ClusterRunStore`.

Threads: the elector's (campaign, keep-alive), the session's (member key, run locks) and
a monitor that reads the leader key every half second: it keeps ``etcd ok/unreachable``
and the leader seen current, acts on switchover requests while leading, on restart
orders while following, retries deferred lock releases and republishes the member record
(generation, ``restart_pending``, the serial it presents) when they change.

With etcd there are three more (:meth:`attach` builds them): the
:class:`~dispatcher.ha.sync.Syncer` (generations: published while leading, applied while
following), the :class:`~dispatcher.ha.restart.RestartCoordinator` (rolling restarts,
leader only) and :class:`~dispatcher.ha.leaderwork.LeaderWork` (requests from ``ced``,
retirement, periodic ``maintain``; leader only).

Lifecycle (the daemon's): :meth:`start`; on SIGTERM :meth:`set_draining`, then
:meth:`step_down` (revoke the election lease at once, a peer takes over), then, once
in-flight requests are done, :meth:`close` (revoke the session lease: member key and run
locks go).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.common import logfmt
from agent.version import __version__
from cluster import maintenance
from cluster.backend import KVBackend, LeaderInfo, MemberInfo
from cluster.election import Elector
from cluster.errors import AccessDenied, BackendUnavailable, MemberConflict
from cluster.locks import ClusterRunLocks
from cluster.session import Session
from cluster.signing import RecordSigner
from dispatcher.config import DispatcherConfig
from dispatcher.core import Dispatcher
from dispatcher.errors import NotLeaderError
from dispatcher.ha import switchover
from dispatcher.ha.coordination import advertise_url, backend_from_config, lease_ttl
from dispatcher.ha.leaderwork import LeaderWork
from dispatcher.ha.records import Records
from dispatcher.ha.replication import Replication
from dispatcher.ha.restart import OrderWatcher, RestartCoordinator
from dispatcher.ha.role import ClusterRole
from dispatcher.ha.runlocks import HARunLocks
from dispatcher.ha.runs import ClusterRunStore
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.sync import Syncer
from dispatcher.ha.writer import FencedWriter
from dispatcher.runlocks import LocalRunLocks
from dispatcher.runstore import RunStore
from dispatcher.statewrite import set_default_writer

if TYPE_CHECKING:
    from dispatcher.history.shared import Publisher

Listener = Callable[[bool], None]


def _cert_serial(path: str) -> str:
    try:
        from dispatcher.pki.ca import cert_serial_hex

        return cert_serial_hex(path)
    except (OSError, ValueError):
        return ""


def _history_publisher(
    cfg: DispatcherConfig, data: KVBackend, records: Records, kind: str
) -> Publisher | None:
    """With etcd: what publishes this instance's job summaries (dispatcher/history)."""
    if kind != "etcd":
        return None
    from dispatcher.history.shared import Publisher
    from dispatcher.history.store import for_config

    return Publisher(for_config(cfg), data, records, max_age=cfg.history_max_age,
                     max_runs=cfg.history_max_runs)  # fmt: skip


def _under(path: Path, root: str) -> bool:
    if not root:
        return False
    p, r = os.path.abspath(path), os.path.abspath(root)
    return p == r or p.startswith(r.rstrip("/") + "/")


class HANode:
    """See the module docstring."""

    MONITOR_PERIOD = 0.5

    def __init__(self, cfg: DispatcherConfig) -> None:
        self.cfg = cfg
        self.instance_id = cfg.instance_id
        self.ttl = lease_ttl(cfg)
        try:
            self.data = backend_from_config(cfg)
            # etcd: the election gets its own client, so a busy data path never delays it
            self.coord = backend_from_config(cfg) if self.data.kind == "etcd" else self.data
        except ValueError as exc:  # bad endpoint URL, cert without key, bad cluster name
            raise cfg.error("etcd_endpoints", f"cluster: {exc}") from None
        self.kind = self.data.kind
        self.health = ClusterHealth()
        # what this instance acts on from the store is sealed with the cluster key
        self.records = Records.for_ca_dir(cfg.ca_dir, self.instance_id)
        self._listeners: list[Listener] = []
        self.on_conflict: Callable[[MemberConflict], None] | None = None
        self.session = Session(self.data, ttl=self.ttl, member=self._member_info(),
                               on_conflict=self._member_conflict)  # fmt: skip
        # no campaign while another process holds this instance's member key
        self.elector = Elector(
            self.coord, self.instance_id, ttl=self.ttl,
            on_elected=self._elected, on_demoted=self._demoted, gate=self.session.holds_member,
            signer=self._signer(),
        )  # fmt: skip
        self.role = ClusterRole(
            self.elector, backend_kind=self.kind, health=self.health,
            generation=self._generation, on_resign=self.step_down,
        )  # fmt: skip
        self.writer = FencedWriter(
            self.elector, health=self.health, effect_for=self._effect_for,
            leader_hint=self.leader_hint,
            # the local store rewrites one JSON file per change: keep its history short
            keep_effects=2000 if self.kind == "etcd" else 200,
            prune_every=200 if self.kind == "etcd" else 50,
        )  # fmt: skip
        self.run_locks = HARunLocks(
            ClusterRunLocks(self.data, self.session, owner=self.instance_id),
            LocalRunLocks(cfg.locks_dir), self.health,
            refuse=cfg.run_lock_without_etcd == "refuse",
        )  # fmt: skip
        self.runs: RunStore = (
            ClusterRunStore(cfg.runs_dir, self.data, self.health)
            if self.kind == "etcd"
            else RunStore(cfg.runs_dir)
        )
        self.history = _history_publisher(cfg, self.data, self.records, self.kind)
        self._members: list[MemberInfo] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="ha-monitor", daemon=True)
        self._closed = False
        # generations, restarts and leader work: etcd only (the embedded backend is one
        # host, whose instances share every file)
        self.sync: Syncer | None = None
        self.restarts: RestartCoordinator | None = None
        self.orders: OrderWatcher | None = None
        self.work: LeaderWork | None = None
        self.replication: Replication | None = None
        self._acked_recorded = 0  # the newest generation this process recorded as acked
        self.paused: maintenance.Pause | None = None  # maintenance mode, read by the monitor
        self.on_restart: Callable[[str], None] | None = None
        if self.kind == "etcd":
            if cfg.sync_mode == "push" and not (cfg.api_cert and cfg.api_key):
                raise cfg.error(
                    "sync_mode", "sync_mode = push needs api_cert and api_key: followers fetch "
                    "the generation files from the leader over mTLS (use sync_mode = shared-fs "
                    "when the state paths are on a shared filesystem)",
                )  # fmt: skip
            self.sync = Syncer(
                cfg, self.data, self.elector, self.session, self.role.guard, self.health,
                lambda fresh: self.members(fresh=fresh), self.records,
                active_operations=self.writer.active_operations,
            )  # fmt: skip
            self.replication = Replication(
                self.instance_id, self.sync, lambda: self.members(fresh=True),
                mode=cfg.sync_ack, timeout=cfg.sync_ack_timeout, covers=self.sync.layout.covers,
                on_acknowledged=self._acknowledged, confirmed=self.sync.pusher.confirmed,
                wait_confirmed=self.sync.pusher.wait_confirmed,
            )  # fmt: skip
            self.writer.on_change = self._changed
            self.writer.gate = self.sync.gate_reason
            self.session.update_member(cert_serial=self.sync.loaded_serial,
                                       generation=self.sync.generation)  # fmt: skip
            self.restarts = RestartCoordinator(
                self.data, self.elector, self.sync, lambda fresh: self.members(fresh=fresh),
                self._restart, settle=max(0.5, float(cfg.drain_wait)),
                busy=lambda: self.work is not None and self.work.busy,
                paused=lambda: self.paused is not None,
            )  # fmt: skip
            self.orders = OrderWatcher(self.data, self.instance_id, self.role.guard, self.sync,
                                       self.is_leader)  # fmt: skip
            self.orders.on_restart = self._restart

    # -- identity --------------------------------------------------------------------------

    def _member_info(self) -> MemberInfo:
        cfg = self.cfg
        return MemberInfo(
            instance_id=self.instance_id, advertise_url=advertise_url(cfg), version=__version__,
            cert_serial=_cert_serial(cfg.cert), generation=0, state="serving",
            health_port=cfg.health_port, pairing_port=cfg.pairing_port,
            proxy_port=int(getattr(cfg, "api_proxy_port", 0) or 0),
            pairing_proxy_port=int(cfg.pairing_proxy_port or 0),
            pid=os.getpid(), host=socket.gethostname(),
        )  # fmt: skip

    def _changed(self, path: Path) -> None:
        """A fenced write or delete happened: publish it, count it for ``sync_ack``."""
        assert self.sync is not None and self.replication is not None
        self.sync.mark_dirty(path)
        self.replication.note(path)

    def _acknowledged(self, generation: int) -> None:
        """Record the generation an operator is told is kept (a later leader lacking it
        waits for a member that has it instead of publishing over it)."""
        from dispatcher.ha.sync import adopt

        if self.cfg.sync_ack != "none":
            if generation <= self._acked_recorded:
                return  # this leader recorded it already (several changes, one generation)
            # (the leader holds the generation itself; the followers keep the mark on
            # their disks: :class:`~dispatcher.ha.sync.state.AckedMark`)
            # no read first: a generation this leader publishes is newer than any before it
            adopt.record_acked(self.data, self.records, generation, known_newer=True)
            self._acked_recorded = generation

    def _generation(self) -> int:
        """The generation this instance runs: what its syncer applied (``/ready`` judges by
        the same), else what its member record says."""
        if self.sync is not None:
            return self.sync.generation
        member = self.session.member
        return member.generation if member is not None else 0

    def _effect_for(self, path: Path) -> str:
        cfg = self.cfg
        if _under(path, cfg.registry_dir):
            return "registry-write"
        if os.path.abspath(path) == os.path.abspath(cfg.rotation_file):
            return "rotation-write"
        if _under(path, cfg.pairing_dir):
            return "pairing-write"
        if _under(path, cfg.ca_dir) or path.name in (Path(cfg.cert).name, Path(cfg.key).name):
            return "ca-write"
        return "state-write"

    # -- lifecycle -------------------------------------------------------------------------

    def attach(self, d: Dispatcher) -> HANode:
        """Plug into a dispatcher: fenced writer (also the process default), run locks,
        run records, the signing guard (only the leader signs) and the leader's work."""
        from dispatcher.pki import ca as pki

        d.writer = self.writer
        d.run_locks = self.run_locks
        d.__dict__.pop("registry", None)  # built lazily with the writer it saw first
        d.__dict__["runstore"] = self.runs
        set_default_writer(self.writer)
        d.sign_guard = self.signing_refused
        d.replication = self.replication
        pki.set_sign_guard(self._sign_check)
        if self.kind == "etcd":
            self.work = LeaderWork(self, d)
            d.retire_blocker = self.work.converged
        return self

    def signing_refused(self) -> str | None:
        """Why this instance must not sign now (None: it leads)."""
        if self.elector.epoch is None:
            leader_id, _ = self.leader_hint()
            return f"only the leader signs ({leader_id or 'no leader right now'})"
        return None

    def _sign_check(self, what: str) -> None:
        reason = self.signing_refused()
        if reason is not None:
            logfmt.event("ca-sign-refused", logging.WARNING, instance=self.instance_id,
                         what=what, reason=reason)  # fmt: skip
            raise NotLeaderError(f"{what}: {reason}")
        logfmt.event("ca-sign", instance=self.instance_id, what=what, epoch=self.elector.epoch)

    def _restart(self, reason: str) -> None:
        if self.on_restart is not None:
            self.on_restart(reason)
        else:
            logfmt.event("restart-ordered", logging.WARNING, instance=self.instance_id,
                         result="ignored", reason="no daemon to restart")  # fmt: skip

    def add_listener(self, fn: Listener) -> None:
        """``fn(leading)`` on every gain or loss of leadership (on the elector's thread)."""
        self._listeners.append(fn)

    def start(self) -> HANode:
        """Join the cluster: the member key first (exclusive), then the election.

        Raises :class:`~cluster.errors.AccessDenied` when etcd refuses the credentials or
        the role, :class:`~cluster.errors.MemberConflict` when another live process holds
        this ``instance_id`` (after waiting a lease TTL for a crashed predecessor's key to
        expire) or another live member advertises this ``advertise_url``. With the store
        unreachable it starts anyway (run and ping never depend on it); the session
        claims the key when it can, and campaigns only after that.
        """
        self._ensure_key()
        self._probe(0)
        self.session.update_member(since=time.time())
        try:
            self.session.join(wait=self.ttl + 1.5)
        except AccessDenied:
            raise  # wrong credentials or role: waiting changes nothing (the daemon exits 78)
        except BackendUnavailable as exc:
            self.health.mark_failed(exc)
            logfmt.event("member-register", logging.WARNING, instance=self.instance_id,
                         result="deferred", error=exc)  # fmt: skip
            self.session.start()
        self.elector.start()
        self._monitor.start()
        for part in (self.sync, self.restarts, self.work):
            if part is not None:
                part.start()
        logfmt.event("cluster-start", instance=self.instance_id, backend=self.kind,
                     cluster=self.cfg.cluster_name, ttl=self.ttl,
                     etcd="ok" if self.health.ok else "unreachable")  # fmt: skip
        return self

    def _signer(self) -> RecordSigner | None:
        """The cluster key's signer on etcd; None on the embedded single-host store (its
        files are this host's own, no other writer to guard against)."""
        return self.records.signer if self.kind == "etcd" else None

    def _ensure_key(self) -> None:
        """Say so when this instance has no cluster key: it refuses every record until it
        has one (the first leader of a new cluster creates it; a follower fetches it once
        from a verified peer, :mod:`dispatcher.ha.sync.keyboot`)."""
        problem = self.records.problem
        if self.kind == "etcd" and problem is not None:
            logfmt.event("cluster-key", logging.WARNING, instance=self.instance_id,
                         result="missing", reason=problem)  # fmt: skip

    def _member_conflict(self, exc: MemberConflict) -> None:
        """The session found this instance's key held by another process (never ours to
        overwrite): no campaign (the election's gate), and the daemon stops (78)."""
        logfmt.event("member-conflict", logging.ERROR, instance=self.instance_id,
                     kind=exc.kind, holder=exc.holder_id, detail=str(exc))  # fmt: skip
        if self.elector.is_leader():
            self.elector.resign()
        if self.on_conflict is not None:
            self.on_conflict(exc)

    def is_leader(self) -> bool:
        return self.elector.is_leader()

    def set_draining(self) -> None:
        """Mark the member record ``draining`` (best effort)."""
        try:
            self.session.update_member(state="draining")
        except BackendUnavailable as exc:
            self.health.mark_failed(exc)

    def step_down(self) -> None:
        """Revoke the election lease now and stop campaigning (SIGTERM)."""
        was = self.elector.epoch
        if was is not None:
            logfmt.event("leader-resign", instance=self.instance_id, epoch=was, reason="shutdown")
        self.elector.stop(resign=True)

    def close(self) -> None:
        """Stop every thread; revoke the session lease (member key and run locks go)."""
        if self._closed:
            return
        self._closed = True
        self.elector.stop(resign=True)
        self._stop.set()
        for part in (self.work, self.restarts, self.sync):
            if part is not None:
                part.stop()
        if self._monitor.is_alive():
            self._monitor.join(5)
        self.session.close(revoke=True)
        from dispatcher.pki import ca as pki

        if pki._sign_guard == self._sign_check:
            pki.set_sign_guard(None)
        self.data.close()
        if self.coord is not self.data:
            self.coord.close()

    # -- elector callbacks -------------------------------------------------------------------

    def _notify(self, leading: bool) -> None:
        for fn in list(self._listeners):
            try:
                fn(leading)
            except Exception as exc:
                logfmt.event("cluster-listener", logging.ERROR, error=exc)

    def _elected(self, epoch: int) -> None:
        self.role.observe(LeaderInfo(self.instance_id, epoch, 0))
        logfmt.event("leader-elected", instance=self.instance_id, epoch=epoch, ttl=self.ttl)
        self._notify(True)

    def _demoted(self) -> None:
        self.role.forget_self()
        logfmt.event("leader-demoted", logging.WARNING, instance=self.instance_id,
                     epoch=self.role.snapshot().epoch)  # fmt: skip
        self._notify(False)

    # -- the leader and the members ----------------------------------------------------------

    def members(self, fresh: bool = False) -> list[MemberInfo]:
        if fresh:
            members = self.data.members()
            with self._lock:
                self._members = members
        with self._lock:
            return list(self._members)

    def leader_hint(self) -> tuple[str | None, str | None]:
        """Leader id and advertise URL as last seen (no store call)."""
        info = self.role.observed()
        if info is None:
            return None, None
        for m in self.members():
            if m.instance_id == info.instance_id:
                return info.instance_id, m.advertise_url or None
        return info.instance_id, None

    def leader_endpoint(self) -> tuple[LeaderInfo, str | None] | None:
        """The current leader (read now) and its advertise URL; None without a leader."""
        info = self.data.leader()
        self.role.observe(info)
        if info is None:
            return None
        for m in self.members(fresh=True):
            if m.instance_id == info.instance_id:
                return info, m.advertise_url or None
        return info, None

    def request_switchover(self, requested_by: str = "", to: str = "") -> dict[str, Any]:
        """Resign if leading (in favour of ``to``), else ask the leader through the store.
        Raises LookupError on no leader, ValueError when ``to`` cannot take over."""
        epoch = self.elector.epoch
        if epoch is not None:
            problem = self._switchover_problem(to)
            if problem is not None:
                raise ValueError(problem)
            self._resign_for_switchover(epoch, to, requested_by)
            return {"leader": self.instance_id, "epoch": epoch, "action": "resigned", "to": to}
        info = self.data.leader()
        if info is None:
            raise LookupError("no leader to switch over from")
        if to == info.instance_id:
            raise ValueError(f"{to} leads already")
        switchover.post_request(self.data, info, requested_by or self.instance_id, to,
                                self._signer())  # fmt: skip
        return {"leader": info.instance_id, "epoch": info.epoch, "action": "requested", "to": to}

    def _switchover_problem(self, to: str) -> str | None:
        """Why ``to`` cannot take over now (None: it can, or no target was named). Reads
        the live members: BackendUnavailable when the store does not answer."""
        if not to:
            return None
        gen = self.sync.generation if self.sync is not None else 0
        problem = (f"{to} leads already" if to == self.instance_id
                   else switchover.target_problem(self.members(fresh=True), to, gen))  # fmt: skip
        return None if problem is None else f"cannot switch over to {to}: {problem}"

    def _resign_for_switchover(self, epoch: int, to: str, requested_by: str) -> None:
        """Resign in favour of ``to`` (checked by :meth:`_switchover_problem` first)."""
        logfmt.event("leader-resign", instance=self.instance_id, epoch=epoch,
                     reason="switchover", to=to, requested_by=requested_by)  # fmt: skip
        self.elector.resign(reason="switchover", to=to, requested_by=requested_by)

    # -- the monitor -------------------------------------------------------------------------

    def _watch(self) -> None:
        period = min(self.MONITOR_PERIOD, self.ttl / 4)
        cycle = 1
        while not self._stop.wait(period):
            self._probe(cycle)
            cycle += 1

    def _probe(self, cycle: int) -> None:
        try:
            before = self.role.observed()
            info = self.data.leader()
            if self.health.mark_ok():
                logfmt.event("cluster-store", instance=self.instance_id, status="ok",
                             backend=self.kind)  # fmt: skip
            self.role.observe(info)
            changed = (before is None) != (info is None) or (
                before is not None and info is not None and before.epoch != info.epoch
            )
            if changed or cycle % 20 == 0:
                self.members(fresh=True)
            self._check_paused()
            if self.elector.is_leader():
                self._check_switchover()
            elif self.orders is not None:
                self.orders.check()
            self.run_locks.retry_releases()
            if cycle % 20 == 1:
                self._record_roster()
            if self.sync is not None:
                self.sync.refresh_member()
            elif cycle % 10 == 0:
                self._refresh_member()
            if self.history is not None:
                self.history.step()  # this host's new job summaries (dispatcher/history)
        except BackendUnavailable as exc:
            if self.health.mark_failed(exc):
                logfmt.event("cluster-store", logging.WARNING, instance=self.instance_id,
                             status="unreachable", error=exc)  # fmt: skip
        except Exception as exc:  # the monitor never dies
            logfmt.event("cluster-monitor", logging.ERROR, error=f"{type(exc).__name__}: {exc}")

    def _record_roster(self) -> None:
        """This instance's roster entry (``dispatcher.ha.roster``), once we hold a key."""
        if self.kind != "etcd" or self.records.problem is not None:
            return
        from dispatcher.ha import roster

        if roster.record(self.data, self.records, self._member_info()):
            logfmt.event("roster", instance=self.instance_id, url=advertise_url(self.cfg))

    def _check_switchover(self) -> None:
        req = switchover.read_request(self.data, self._signer(), self.records.reject)
        if req is None:
            return
        epoch = self.elector.epoch
        wanted = req.get("epoch")
        if epoch is not None and wanted == epoch:
            to = str(req.get("to") or "")
            # checked before the request is taken: should the store not answer, the
            # request stays for the next look instead of vanishing unanswered
            problem = self._switchover_problem(to)
            self.data.delete_value(self.data.keys.switchover)
            if problem is not None:
                logfmt.event("switchover-refused", logging.WARNING, instance=self.instance_id,
                             epoch=epoch, reason=problem)  # fmt: skip
                return
            self._resign_for_switchover(epoch, to, str(req.get("requested_by") or ""))
        elif epoch is not None and (not isinstance(wanted, int) or wanted < epoch):
            self.data.delete_value(self.data.keys.switchover)  # stale request

    def _check_paused(self) -> None:
        was, self.paused = self.paused, maintenance.read(self.data, self._signer(),
                                                         self.records.reject)  # fmt: skip
        if (was is None) != (self.paused is None):
            p = self.paused
            logfmt.event("cluster-paused" if p else "cluster-resumed", instance=self.instance_id,
                         by=p.by if p else "", reason=p.reason if p else "")  # fmt: skip

    def _refresh_member(self) -> None:
        member = self.session.member
        serial = _cert_serial(self.cfg.cert)
        if member is not None and serial and serial != member.cert_serial:
            self.session.update_member(cert_serial=serial)
            logfmt.event("member-update", instance=self.instance_id, cert_serial=serial)
