""":class:`Syncer`: the one object the instance talks to about generations.

It owns the ``ha-sync`` thread: while leading, the :class:`~.publisher.Publisher` steps;
otherwise the :class:`~.follower.Follower` does. It keeps the member key current
(generation, ``restart_pending``, the presented certificate serial) and answers the API
(``/ready``, peer file serving through :class:`~.serving.PeerFiles`).

Restart: a process presents the certificates it loaded. When the files of the
certificate, key or CA (or the API's) differ from what the process loaded,
``restart_pending`` is set in its member key; the leader then restarts members one at a
time (:mod:`dispatcher.ha.restart`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.common import logfmt
from cluster.backend import KVBackend, MemberInfo
from cluster.election import Elector, EpochGuard
from cluster.errors import BackendUnavailable, Fenced, NotLeader
from cluster.session import Session
from dispatcher.config import DispatcherConfig
from dispatcher.ha.manifest import Entry, Generation, Layout, Scanner, material
from dispatcher.ha.records import Records
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.sync.fetcher import Fetcher
from dispatcher.ha.sync.follower import Follower
from dispatcher.ha.sync.keyboot import bootstrap_key
from dispatcher.ha.sync.publisher import Publisher
from dispatcher.ha.sync.push import Pusher, decode
from dispatcher.ha.sync.serving import PeerFiles, cert_serial
from dispatcher.ha.sync.state import AckedMark, AppliedState, EpochRecord
from dispatcher.ha.sync.store import GenerationStore
from dispatcher.ha.sync.swapper import Swapper

ev = logfmt.event
MembersFn = Callable[[bool], list[MemberInfo]]


class Syncer:
    FETCH_TIMEOUT = Fetcher.TIMEOUT

    def __init__(
        self,
        cfg: DispatcherConfig,
        backend: KVBackend,
        elector: Elector,
        session: Session,
        guard: EpochGuard,
        health: ClusterHealth,
        members: MembersFn,
        records: Records,
        *,
        active_operations: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.mode = cfg.sync_mode
        self.elector = elector
        self.me = elector.instance_id
        self.session = session
        self.leader_guard = guard  # newest leader epoch seen (the role's)
        self.health = health
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ha-sync", daemon=True)
        # what this process loaded (its TLS contexts present these)
        self.loaded = material(cfg)
        self.loaded_serial = cert_serial(cfg.cert)
        self._member_view: tuple[int, bool, str] | None = None
        self.layout = Layout(cfg)
        self.scanner = Scanner(self.layout)
        self.state = AppliedState(cfg.state_dir, self.me, self.refresh_member)
        self.records = records
        self.files = PeerFiles(cfg, self.layout, self.state, clock)
        self.fetcher = Fetcher(cfg, self.me, members, self.files.server_serials)
        self.pusher = Pusher(cfg, self.me, lambda: members(False), self.files.server_serials)
        self.swapper = Swapper(self.layout, self.scanner, self.fetcher)
        self.store = GenerationStore(backend, records)
        epochs = EpochRecord(cfg.state_dir, backend.store_id)
        # the store id read once at start (by the epoch record): no second etcd call here
        self.acked_mark = AckedMark(cfg.state_dir, lambda: epochs.store)
        self.follower = Follower(backend, self.state, self.swapper, health, guard, records,
                                 self.store, epochs, mode=self.mode, clock=clock,
                                 acked_mark=self.acked_mark)  # fmt: skip
        self.publisher = Publisher(
            backend, elector, self.state, self.scanner, health, self.follower.handle, records,
            self.store,
            mode=self.mode, catch_up_limit=3 * max(1.0, cfg.lease_ttl),
            active_operations=active_operations, clock=clock, stop=self._stop,
            acked_mark=self.acked_mark, members=lambda: members(True),
            pusher=self.pusher if self.mode == "push" else None,
        )  # fmt: skip
        self.follower.bootstrap = lambda raw: bootstrap_key(
            records, self.fetcher, self.layout, backend.keys.generation, raw, self.store
        )
        self.state.load(self.scanner, check_files=self.mode == "push")
        if self.mode == "push":
            self.swapper.clean_stage()

    # -- state -------------------------------------------------------------------------------

    @property
    def applied(self) -> Generation | None:
        return self.state.applied

    @property
    def generation(self) -> int:
        return self.state.number

    def restart_pending(self) -> bool:
        """The certificate/key/CA files differ from what this process loaded."""
        return material(self.cfg) != self.loaded

    def reloaded(self) -> None:
        """SIGHUP reloaded the API certificate: what is loaded now, unless a CA changed
        (a CA is in the TLS contexts' trust stores, which only a restart renews)."""
        now = material(self.cfg)
        if all(now[k] == self.loaded[k] for k in ("ca", "api_client_ca", "operator_ca")):
            self.loaded = now
            self.loaded_serial = cert_serial(self.cfg.cert)
        self.refresh_member()

    def gate_reason(self) -> str | None:
        """Why leader-only work must wait (a new leader catching up), else None."""
        return self.publisher.gate_reason()

    def ready_problem(self) -> str | None:
        """``/ready`` waits until this instance runs the cluster's current generation.

        Leading: once caught up, or while catching up if it ran the published head it
        read as a follower (elected in sync: it serves runs as it did a moment before; one
        that lacks an acknowledged generation does not). Following: once the applied
        generation is the head last read from the store (while the store is unreachable,
        the last one read), or while it applies a newer head, having run the one before
        (:meth:`Follower.applying`: at most ``LAG_GRACE`` s, nothing failing). Never on a
        timer: a diverged instance stays out of the load balancer until it converges."""
        f = self.follower
        if self.elector.epoch is not None:
            reason = self.publisher.gate_reason()
            if reason is not None and not self.publisher.behind and f.read_once and f.in_sync():
                return None
            return reason
        if self.publisher.lead_epoch is not None:  # the sync thread has yet to step down
            return "no longer the leader: waiting to read the published generation"
        if not f.read_once:
            return "waiting to read the published generation"
        if f.in_sync() or f.applying():
            return None
        head = f.head
        have = self.state.number
        want = head.number if head is not None else 0
        why = f" ({f.last_error})" if f.last_error else ""
        return f"not in sync: runs generation {have}, the cluster published {want}{why}"

    def sync_view(self) -> dict[str, object]:
        """The sync part of ``/status``: the generation this instance runs, the one
        published, and whether they agree."""
        f = self.follower
        head = f.head
        leading = self.elector.epoch is not None
        applied = self.state.applied
        if leading:
            state = "in-sync" if self.publisher.caught_up else "catching-up"
        elif not f.read_once:
            state = "unknown"
        elif f.in_sync():
            state = "in-sync"
        elif f.last_error or f.retry_at is not None:
            state = "diverged"
        else:
            state = "behind"
        published = applied if leading else head
        return {
            "state": state,
            "generation": applied.number if applied is not None else 0,
            "manifest": applied.manifest_sha256[:16] if applied is not None else None,
            "published": published.number if published is not None else 0,
            "published_epoch": published.epoch if published is not None else None,
            "published_manifest": (
                published.manifest_sha256[:16] if published is not None else None
            ),
            "error": f.last_error or None,
            "record_error": self.state.write_error or None,
        }

    def published_current(self) -> bool:
        """Leading, caught up, and the files are exactly the generation last published."""
        return self.publisher.published_current()

    def mark_dirty(self, _path: object = None) -> None:
        self.publisher.mark_dirty(_path)

    def publish_soon(self) -> None:
        self.publisher.publish_soon()

    def ticket(self) -> int:
        return self.publisher.ticket()

    def covered(self) -> tuple[int, int]:
        return self.publisher.covered()

    def covered_in(self, epoch: int) -> tuple[int, int] | None:
        return self.publisher.covered_in(epoch)

    def publish(self, epoch: int, force: bool = False) -> Generation | None:
        return self.publisher.publish(epoch, force)

    # -- serving (any member) ----------------------------------------------------------------

    def peer_serials(self) -> set[str]:
        """Serials a peer may present to fetch files (see :class:`PeerFiles`)."""
        return self.files.peer_serials()

    def server_serials(self) -> set[str]:
        """Serials a peer's API may present to be fetched from or forwarded to."""
        return self.files.server_serials()

    def serve(self, logical: str, number: int) -> tuple[int, bytes | str, Entry | None]:
        """``(200, bytes, entry)`` for a file of generation ``number``, else an error."""
        return self.files.serve(logical, number)

    def receive_push(self, body: bytes) -> int:
        """A generation the leader pushed (``POST /cluster/files/``, the peer checked): the
        generation this instance runs once it is applied; :class:`PushRefused` when not."""
        from dispatcher.ha.sync.push import PushRefused

        number = self.follower.pushed(decode(body), leading=lambda: self.elector.epoch is not None)
        view = self._member_view
        if view is None or view[0] < number:  # the leader counts only what etcd says too
            raise PushRefused(f"generation {number} is applied, but not yet in the member record")
        return number

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Syncer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.FETCH_TIMEOUT + 2)
        self.pusher.close()
        if not self._thread.is_alive():
            self.fetcher.close()

    def tick(self) -> None:
        """One step of the sync thread: publish as the leader, follow otherwise."""
        self.state.flush()  # applied.json, until a failed write succeeds
        epoch = self.elector.epoch
        if epoch is not None:
            self.publisher.step(epoch)
            return
        if self.publisher.lead_epoch is not None:  # it led until now: not ready before
            self.follower.stepped_down()  # it read the store (step_down forgets the epoch)
        self.publisher.step_down()
        self.follower.step()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except BackendUnavailable as exc:
                self.health.mark_failed(exc)
                self._stop.wait(0.5)
            except (NotLeader, Fenced) as exc:
                ev("generation-publish", logging.WARNING, result="fenced", error=exc)
                self._stop.wait(0.1)
            except Exception as exc:  # the sync thread never dies
                ev("sync-error", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.5)

    # -- the member record -------------------------------------------------------------------

    def refresh_member(self) -> None:
        """Publish generation, restart_pending and the presented serial when they change."""
        view = (self.generation, self.restart_pending(), self.loaded_serial)
        if view == self._member_view:
            return
        try:
            self.session.update_member(generation=view[0], restart_pending=view[1],
                                       cert_serial=view[2])  # fmt: skip
        except BackendUnavailable as exc:
            self.health.mark_failed(exc)
            return
        if self._member_view is None or self._member_view[1] != view[1]:
            ev("member-update", instance=self.me, generation=view[0], restart_pending=view[1],
               cert_serial=view[2])  # fmt: skip
        self._member_view = view
