""":class:`Syncer`: generations published by the leader, applied by every follower.

Leader side: every leader-only write goes through the fenced writer, which marks the
state dirty; once no leader-only operation is running (and 50 ms passed since the last
write), the leader scans its files (:mod:`dispatcher.ha.manifest`) and, if the manifest
changed, publishes generation N+1 under ``/<cluster>/generation`` through a fenced
transaction (it applies only while the leader key's create revision is the leader's
epoch). It also rescans every 2 s (files edited by hand are published too) and
republishes when the key in the store is not the one it wrote.

A newly elected leader first *catches up*: when the published generation is not the
one its files hold, it fetches that generation from the members that applied it (the
old leader may be gone); until then leader-only work is refused ("catching up"). If no
member can serve it within three lease TTLs the leader publishes its own files (logged
``sync-diverged``). Then it publishes N+1 under its own epoch, so followers, which refuse
generations from an epoch older than the newest they have seen, follow the new leader.

Follower side (``sync_mode = push``): for each new generation it diffs the manifest
against its files, fetches every changed file from the leader (then from any member that
applied the generation) with ``GET /cluster/files/<path>?generation=N`` over mTLS,
verifies size and sha256, writes each into a stage directory next to its target (same
filesystem) and fsyncs it; only when *every* file is staged does it rename each into
place (keys first), remove the files the generation no longer has, fsync the directories
and verify the whole manifest again. A crash leaves old files, new files or leftover
stage directories, never a partial file; the applied generation is recorded (in
``<state_dir>/sync/applied.json`` and the member key) only after the swap, so a
restarted follower diffs again and converges. Leftover stage directories are removed at
start. With ``sync_mode = shared-fs`` there is nothing to copy: the generation is recorded.

Restart: a process presents the certificates it loaded. When the files of the
certificate, key or CA (or the API's) differ from what the process loaded,
``restart_pending`` is set in its member key; the leader then restarts members one at a
time (:mod:`dispatcher.ha.restart`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.common import logfmt
from agent.common.errors import CtrlExecError
from agent.common.fsutil import atomic_write, fsync_dir
from agent.common.serial import serial_to_hex
from cluster.backend import KVBackend, MemberInfo
from cluster.election import Elector, EpochGuard
from cluster.errors import BackendUnavailable, Fenced, NotLeader, StaleEpoch
from cluster.session import Session
from dispatcher.config import DispatcherConfig
from dispatcher.ha import peer
from dispatcher.ha.manifest import (
    MAX_FILE,
    STAGE_DIR,
    Entry,
    Generation,
    Layout,
    ManifestError,
    Scanner,
    manifest_hash,
    material,
)
from dispatcher.ha.storehealth import ClusterHealth

ev = logfmt.event
MembersFn = Callable[[bool], list[MemberInfo]]


class SyncError(CtrlExecError):
    """A generation could not be applied now (the follower retries)."""


def cert_serial(path: str) -> str:
    try:
        from dispatcher.pki.ca import cert_serial_hex

        return cert_serial_hex(path)
    except (OSError, ValueError):
        return ""


class Syncer:
    WATCH = 0.25  # follower: longest wait on the generation key before looking again
    DEBOUNCE = 0.05  # leader: quiet time after the last write before publishing
    RESCAN = 2.0  # leader: rescan the files this often (hand edits get published)
    STORE_CHECK = 5.0  # leader: check that the store still holds its generation
    RECHECK = 5.0  # follower: read the generation at least this often (besides the watch)
    FETCH_TIMEOUT = 10.0
    INITIAL_SYNC_MAX = 30.0  # /ready waits at most this long for the first sync

    def __init__(
        self,
        cfg: DispatcherConfig,
        backend: KVBackend,
        elector: Elector,
        session: Session,
        guard: EpochGuard,
        health: ClusterHealth,
        members: MembersFn,
        *,
        active_operations: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.mode = cfg.sync_mode
        self.backend = backend
        self.key = backend.keys.generation
        self.elector = elector
        self.me = elector.instance_id
        self.session = session
        self.leader_guard = guard  # newest leader epoch seen (the role's)
        self.guard = EpochGuard()  # newest generation epoch accepted
        self.health = health
        self.members = members
        self.active_operations = active_operations
        self._clock = clock
        self.layout = Layout(cfg)
        self.scanner = Scanner(self.layout)
        self.state_file = Path(cfg.state_dir) / "sync" / "applied.json"
        self.catch_up_limit = 3 * max(1.0, cfg.lease_ttl)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ha-sync", daemon=True)
        self._started = clock()
        # what this process loaded (its TLS contexts present these)
        self.loaded = material(cfg)
        self.loaded_serial = cert_serial(cfg.cert)
        self.applied: Generation | None = None
        self.synced_once = False
        self.caught_up = False
        self._lead_epoch: int | None = None
        self._catch_up_deadline = 0.0
        self._published_rev = 0
        self._dirty = False
        self._last_change = 0.0
        self._next_rescan = 0.0
        self._store_due = 0.0
        self._seen_rev = 0
        self._watch_rev = 0
        self._need_read = True
        self._next_read = 0.0
        self._retry_at: float | None = None
        self._backoff = 0.25
        self._refused_rev = 0
        self._serials: tuple[float, set[str]] = (0.0, set())
        self._member_view: tuple[int, bool, str] | None = None
        self.applied = self._load_applied()
        if self.mode == "push":
            self._clean_stage()

    # -- state -------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        g = self.applied
        return g.number if g is not None else 0

    def restart_pending(self) -> bool:
        """The certificate/key/CA files differ from what this process loaded."""
        return material(self.cfg) != self.loaded

    def reloaded(self) -> None:
        """SIGHUP reloaded the API certificate: what is loaded now, unless a CA changed
        (a CA is in the TLS contexts' trust stores, which only a restart renews)."""
        now = material(self.cfg)
        if all(now[k] == self.loaded[k] for k in ("ca", "api_client_ca")):
            self.loaded = now
            self.loaded_serial = cert_serial(self.cfg.cert)
        self.refresh_member()

    def gate_reason(self) -> str | None:
        """Why leader-only work must wait (a new leader catching up), else None."""
        epoch = self.elector.epoch
        if epoch is None:
            return None
        if self._lead_epoch != epoch or not self.caught_up:
            return "the leader is catching up with the published generation; retry shortly"
        return None

    def ready_problem(self) -> str | None:
        """``/ready`` waits for the first sync after start (not while etcd is down)."""
        if self.synced_once or not self.health.ok:
            return None
        if self._clock() - self._started > self.INITIAL_SYNC_MAX:
            return None
        return "initial sync with the published generation"

    def published_current(self) -> bool:
        """Leading, caught up, and the files are exactly the generation last published."""
        epoch = self.elector.epoch
        if epoch is None or self._lead_epoch != epoch or not self.caught_up:
            return False
        with self._lock:
            dirty = self._dirty
        g = self.applied
        if dirty or self.active_operations() or g is None or g.epoch != epoch:
            return False
        return manifest_hash(self.scanner.scan()) == g.manifest_sha256

    def mark_dirty(self, _path: object = None) -> None:
        with self._lock:
            self._dirty = True
            self._last_change = self._clock()

    def _load_applied(self) -> Generation | None:
        try:
            g = Generation.from_json(self.state_file.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ManifestError) as exc:
            ev("sync-state", logging.WARNING, path=self.state_file, error=exc)
            return None
        if self.mode == "push" and manifest_hash(self.scanner.scan()) != g.manifest_sha256:
            ev("sync-state", logging.WARNING, generation=g.number,
               reason="local files differ from the recorded generation; will sync again")  # fmt: skip
            return None
        return g

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Syncer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.FETCH_TIMEOUT + 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                epoch = self.elector.epoch
                if epoch is not None:
                    self._lead_step(epoch)
                else:
                    self._lead_epoch = None
                    self.caught_up = False
                    self._follow_step()
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

    def _record(self, g: Generation, **detail: Any) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_file, g.to_json(), 0o600)
        self.applied = g
        self.synced_once = True
        self.refresh_member()
        if detail:
            ev("sync-applied", generation=g.number, epoch=g.epoch, leader=g.leader,
               instance=self.me, **detail)  # fmt: skip

    # -- follower ----------------------------------------------------------------------------

    def _follow_step(self) -> None:
        """Read the generation when the watch saw a change (or every ``RECHECK`` s, or when
        a failed apply is due again); apply it if it is new; then watch the key."""
        now = self._clock()
        retry_due = self._retry_at is not None and now >= self._retry_at
        if self._need_read or retry_due or now >= self._next_read:
            self._need_read = False
            self._next_read = now + self.RECHECK
            # watch from the store's revision of this read (recent, so never compacted away)
            self._watch_rev = self.backend.revision()
            kv = self.backend.get_kv(self.key)
            self.health.mark_ok()
            if kv is None:
                self.synced_once = True  # nothing published yet
            elif kv.mod_rev != self._seen_rev or retry_due:
                self._seen_rev = kv.mod_rev
                self._retry_at = None
                self._handle(kv.value, kv.mod_rev)
        wait = self.WATCH
        if self._retry_at is not None:
            wait = max(0.01, min(wait, self._retry_at - self._clock()))
        start = self._watch_rev + 1 if self._watch_rev else None
        if self.backend.watch_key(self.key, wait, start) is not None:
            self._need_read = True

    def _handle(self, raw: bytes, rev: int = 0, *, as_leader: bool = False) -> bool:
        """Apply the generation document ``raw``; True when this instance now runs it."""
        try:
            g = Generation.from_json(raw)
        except ManifestError as exc:
            if rev != self._refused_rev:
                self._refused_rev = rev
                ev("sync-refused", logging.WARNING, instance=self.me, reason=f"malformed: {exc}")
            return False
        if not as_leader:
            newest = max(self.guard.newest, self.leader_guard.newest)
            try:
                if g.epoch < newest:
                    raise StaleEpoch(g.epoch, newest)
                self.guard.check(g.epoch)
            except StaleEpoch as exc:
                if rev != self._refused_rev:
                    self._refused_rev = rev
                    ev("sync-refused", logging.WARNING, instance=self.me, generation=g.number,
                       epoch=g.epoch, newest_epoch=exc.newest,
                       reason="generation from an epoch older than the newest seen")  # fmt: skip
                self.synced_once = True  # wait for the current leader's generation
                return False
        cur = self.applied
        if cur is not None and (cur.number, cur.manifest_sha256) == (g.number, g.manifest_sha256):
            self.synced_once = True
            return True
        t0 = self._clock()
        try:
            report = self._apply_push(g) if self.mode == "push" else {"copied": 0}
        except (SyncError, ManifestError, OSError) as exc:
            self._retry_at = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
            ev("sync-failed", logging.WARNING, instance=self.me, generation=g.number,
               error=f"{type(exc).__name__}: {exc}", retry_in=round(self._backoff / 2, 2))  # fmt: skip
            return False
        self._backoff = 0.25
        self._record(g, took_ms=round((self._clock() - t0) * 1000), mode=self.mode, **report)
        return True

    # -- applying (push) ---------------------------------------------------------------------

    def _clean_stage(self) -> None:
        for d in self.layout.stage_dirs():
            shutil.rmtree(d, ignore_errors=True)
            ev("sync-stage-cleanup", path=d)

    def _sources(self, g: Generation) -> list[MemberInfo]:
        """Who can serve ``g``: its publisher first, then members that applied it."""
        members = [m for m in self.members(True) if m.instance_id != self.me and m.advertise_url]
        first = [m for m in members if m.instance_id == g.leader]
        rest = sorted((m for m in members if m.instance_id != g.leader and m.generation == g.number),
                      key=lambda m: m.instance_id)  # fmt: skip
        return first + rest

    def _apply_push(self, g: Generation) -> dict[str, Any]:
        self._clean_stage()
        local = self.scanner.scan()
        todo: list[Entry] = []
        chmod: list[Entry] = []
        for path, e in sorted(g.files.items()):
            cur = local.get(path)
            if cur is None or cur.sha256 != e.sha256 or cur.size != e.size:
                todo.append(e)
            elif cur.mode != e.mode:
                chmod.append(e)
        remove = sorted(p for p in local if p not in g.files)
        # every path must map somewhere before anything is touched
        targets = {e.path: self.layout.local(e.path) for e in todo + chmod}
        gone = {p: self.layout.local(p) for p in remove}
        sources: list[str] = []
        staged: dict[str, Path] = {}
        if todo:
            staged, sources = self._stage(g, todo, targets)
        touched: set[Path] = set()
        # keys first: a reader between two renames then sees an old cert with a new key,
        # which every loader refuses and retries, rather than a new cert with an old key
        for e in sorted(todo, key=lambda e: (0 if ".key" in Path(e.path).name else 1, e.path)):
            os.replace(staged[e.path], targets[e.path])
            touched.add(targets[e.path].parent)
        for e in chmod:
            os.chmod(targets[e.path], e.mode)
        for p in gone.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            touched.add(p.parent)
        self._clean_stage()
        for d in sorted({p.parent for p in gone.values()}, key=lambda x: -len(x.parts)):
            self._prune_empty(d, touched)
        for d in touched:
            fsync_dir(d)
        after = manifest_hash(self.scanner.scan())
        if after != g.manifest_sha256:
            raise SyncError(f"local files differ from generation {g.number} after the swap")
        return {"fetched": len(todo), "removed": len(remove), "chmod": len(chmod),
                "source": ",".join(sources) or "-"}  # fmt: skip

    def _prune_empty(self, d: Path, touched: set[Path]) -> None:
        """Remove ``d`` and its parents while empty, up to (not including) a synced root."""
        roots = set(self.layout.roots.values())
        while d not in roots and any(d.is_relative_to(r) for r in roots):
            try:
                d.rmdir()
            except OSError:
                return
            touched.discard(d)
            touched.add(d.parent)
            d = d.parent

    def _stage(
        self, g: Generation, todo: list[Entry], targets: dict[str, Path]
    ) -> tuple[dict[str, Path], list[str]]:
        sources = self._sources(g)
        if not sources:
            raise SyncError(f"no member can serve generation {g.number}")
        conns: dict[str, http.client.HTTPConnection] = {}
        used: list[str] = []
        staged: dict[str, Path] = {}
        try:
            for e in todo:
                target = targets[e.path]
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                sdir = target.parent / STAGE_DIR
                sdir.mkdir(mode=0o700, exist_ok=True)
                data, who = self._fetch(sources, conns, e, g.number)
                if who not in used:
                    used.append(who)
                dest = sdir / target.name
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                try:
                    _write_all(fd, data)
                    os.fchmod(fd, e.mode)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                staged[e.path] = dest
        finally:
            for c in conns.values():
                c.close()
        for d in {p.parent for p in staged.values()}:
            fsync_dir(d)
        return staged, used

    def _fetch(
        self,
        sources: list[MemberInfo],
        conns: dict[str, http.client.HTTPConnection],
        e: Entry,
        number: int,
    ) -> tuple[bytes, str]:
        errors: list[str] = []
        for m in sources:
            if not m.advertise_url.startswith("https://"):
                errors.append(f"{m.instance_id}: no TLS on {m.advertise_url}")
                continue
            for attempt in (1, 2):  # a kept-alive connection may have been closed meanwhile
                conn = conns.get(m.instance_id)
                if conn is None:
                    conn = conns[m.instance_id] = peer.connect(self.cfg, m.advertise_url,
                                                               self.FETCH_TIMEOUT)  # fmt: skip
                try:
                    conn.request("GET", peer.file_url_path(m.advertise_url, e.path, number))
                    resp = conn.getresponse()
                    data = resp.read(MAX_FILE + 1)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conns.pop(m.instance_id, None)
                    if attempt == 2:
                        errors.append(f"{m.instance_id}: {type(exc).__name__}: {exc}")
                    continue
                if resp.status != 200:
                    errors.append(f"{m.instance_id}: HTTP {resp.status} {data[:200]!r}")
                    break
                if len(data) != e.size or hashlib.sha256(data).hexdigest() != e.sha256:
                    errors.append(f"{m.instance_id}: {e.path} does not match the manifest")
                    break
                return data, m.instance_id
        raise SyncError(f"cannot fetch {e.path} of generation {number}: {'; '.join(errors)}")

    # -- serving (any member) ----------------------------------------------------------------

    def peer_serials(self) -> set[str]:
        """Serials a peer may present to fetch files: the cluster's current and previous
        dispatcher certificate (the previous one while a rotation's overlap runs)."""
        now = self._clock()
        at, cached = self._serials
        if cached and now - at < 1.0:
            return cached
        out: set[str] = set()
        for path in (self.cfg.cert, f"{self.cfg.cert}.prev"):
            s = serial_to_hex(cert_serial(path))
            if s:
                out.add(s)
        try:
            from dispatcher.pki import rotation_state as rs

            state = rs.load(self.cfg.rotation_file)
        except Exception:
            state = None
        if state is not None:
            for value in (state.current_serial, state.previous_serial):
                if value and serial_to_hex(value):
                    out.add(serial_to_hex(value))
        self._serials = (now, out)
        return out

    def serve(self, logical: str, number: int) -> tuple[int, bytes | str, Entry | None]:
        """``(200, bytes, entry)`` for a file of generation ``number``, else an error."""
        g = self.applied
        if g is None or g.number != number:
            have = g.number if g is not None else 0
            return 409, f"generation {number} is not served here (this instance runs {have})", None
        e = g.files.get(logical)
        if e is None:
            return 404, f"{logical} is not part of generation {number}", None
        try:
            data = self.layout.local(logical).read_bytes()
        except (OSError, ManifestError) as exc:
            return 409, f"cannot read {logical}: {exc}", None
        if len(data) != e.size or hashlib.sha256(data).hexdigest() != e.sha256:
            return 409, f"{logical} changed since generation {number}", None
        return 200, data, e

    # -- leader ------------------------------------------------------------------------------

    def _lead_step(self, epoch: int) -> None:
        now = self._clock()
        if epoch != self._lead_epoch:
            self._lead_epoch = epoch
            self.caught_up = False
            self._catch_up_deadline = now + self.catch_up_limit
            self._published_rev = 0
        if not self.caught_up:
            self._catch_up(epoch)
            return
        with self._lock:
            dirty, last = self._dirty, self._last_change
        quiet = self.active_operations() == 0 and now - last >= self.DEBOUNCE
        if (dirty and quiet) or now >= self._next_rescan:
            self.publish(epoch)
        else:
            self._stop.wait(0.03)

    def _catch_up(self, epoch: int) -> None:
        kv = self.backend.get_kv(self.key)
        self.health.mark_ok()
        store_g: Generation | None = None
        if kv is not None:
            with contextlib.suppress(ManifestError):
                store_g = Generation.from_json(kv.value)
        if store_g is not None and self.mode == "push":
            mh = manifest_hash(self.scanner.scan())
            if mh != store_g.manifest_sha256:
                if not self._handle(kv.value if kv else b"", as_leader=True):
                    if self._clock() < self._catch_up_deadline:
                        self._stop.wait(0.3)
                        return
                    ev("sync-diverged", logging.WARNING, instance=self.me, epoch=epoch,
                       generation=store_g.number,
                       reason="no member serves the published generation; publishing this "
                              "instance's files instead")  # fmt: skip
            elif self.applied is None or self.applied.number != store_g.number:
                self._record(store_g)
        self.caught_up = True
        self.synced_once = True
        ev("sync-leader-ready", instance=self.me, epoch=epoch,
           generation=store_g.number if store_g else 0)  # fmt: skip
        self.publish(epoch, force=True)

    def publish(self, epoch: int, force: bool = False) -> Generation | None:
        """Publish the local files as a new generation if they changed (or ``force``)."""
        now = self._clock()
        with self._lock:
            self._dirty = False
        self._next_rescan = now + self.RESCAN
        files = self.scanner.scan()
        mh = manifest_hash(files)
        mine = self.applied
        same = mine is not None and mine.manifest_sha256 == mh and mine.epoch == epoch
        if not force and same and now < self._store_due:
            return None  # nothing changed; the store is checked every STORE_CHECK s
        self._store_due = now + self.STORE_CHECK
        kv = self.backend.get_kv(self.key)
        ours = kv is not None and kv.mod_rev == self._published_rev
        if not force and ours and mine is not None and mine.manifest_sha256 == mh:
            return None
        store_n = 0
        if kv is not None:
            try:
                store_n = Generation.from_json(kv.value).number
            except ManifestError:
                store_n = 0
        number = max(store_n, mine.number if mine is not None else 0) + 1
        g = Generation(number, epoch, self.me, mh, files, time.time(), self.mode)
        certs = mine is None or _material_paths(mine) != _material_paths(g)
        rec = self.elector.commit(
            "generation-publish", puts={self.key: g.to_json()}, epoch=epoch,
            detail={"generation": number, "manifest_sha256": mh, "files": len(files)},
        )  # fmt: skip
        self._published_rev = rec.revision
        self._record(g)
        reason = "forced" if force else ("store-changed" if not ours else "files-changed")
        ev("generation-publish", generation=number, epoch=epoch, files=len(files),
           manifest=mh[:16], reason=reason, certs_changed=certs, instance=self.me)  # fmt: skip
        return g


def _material_paths(g: Generation) -> dict[str, str]:
    return {p: e.sha256 for p, e in g.files.items()
            if p.endswith((".crt", ".key", "pki/cert", "pki/key", "pki/ca"))}  # fmt: skip


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
