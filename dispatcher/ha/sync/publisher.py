"""Leader side: catch up with the published generation, then publish the local files.

Every leader-only write goes through the fenced writer, which marks the state dirty; once
no leader-only operation is running (and :attr:`Publisher.DEBOUNCE` passed since the last
write), the leader scans its files and, if the manifest changed, publishes generation N+1
through a fenced transaction. It also rescans every :attr:`Publisher.RESCAN` s (files
edited by hand are published too) and republishes when the key in the store is not the one
it wrote.

A newly elected leader first *catches up* (see :meth:`Publisher.catch_up`); until then
leader-only work is refused (:meth:`Publisher.gate_reason`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable

from agent.common import logfmt
from cluster.backend import KVBackend, MemberInfo
from cluster.election import Elector
from dispatcher.ha.manifest import Generation, ManifestError, Scanner, manifest_hash
from dispatcher.ha.records import Records
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.sync.push import Pusher
from dispatcher.ha.sync.state import AckedMark, AppliedState
from dispatcher.ha.sync.store import GenerationStore

ev = logfmt.event
ApplyFn = Callable[..., bool]  # Follower.handle(raw, rev=0, *, as_leader=False)


class Publisher:
    DEBOUNCE = 0.05  # quiet time after the last write before publishing
    RESCAN = 2.0  # rescan the files this often (hand edits get published)
    STORE_CHECK = 5.0  # check that the store still holds this leader's generation
    CHUNK_CHECK = 30.0  # and that its chunks are intact (one prefix read)

    def __init__(
        self,
        backend: KVBackend,
        elector: Elector,
        state: AppliedState,
        scanner: Scanner,
        health: ClusterHealth,
        apply: ApplyFn,
        records: Records,
        gstore: GenerationStore,
        *,
        mode: str,
        catch_up_limit: float,
        active_operations: Callable[[], int],
        clock: Callable[[], float],
        stop: threading.Event,
        acked_mark: AckedMark | None = None,
        members: Callable[[], list[MemberInfo]] = lambda: [],
        pusher: Pusher | None = None,
    ) -> None:
        self.backend = backend
        self.key = backend.keys.generation
        self.elector = elector
        self.me = elector.instance_id
        self.state = state
        self.scanner = scanner
        self.health = health
        self.apply = apply
        self.records = records  # its key seals what it publishes (through gstore)
        self.gstore = gstore
        self.mode = mode
        self.catch_up_limit = catch_up_limit
        self.active_operations = active_operations
        self._clock = clock
        self._stop = stop
        self.acked_mark = acked_mark  # the newest acknowledged generation, on this disk
        self.members = members  # live member records (a handover to one that has it)
        self.pusher = pusher  # sends each new generation to the followers (push mode)
        self._soon = threading.Event()  # publish_soon(): skip the debounce once
        self._lock = threading.Lock()
        self.caught_up = False
        self.lead_epoch: int | None = None
        self._catch_up_deadline = 0.0
        self._behind = 0  # the published generation this leader lacks and waits for (0: none)
        self._behind_logged = -1e9
        self._published_rev = 0
        # the head this leader published last (with its chunk names), while the store holds
        # it as far as it knows (the last read found its revision): what a publish writes over
        self._own_head: Generation | None = None
        self._dirty = False
        self._last_change = 0.0
        # Every write marks the state dirty after it is on disk and bumps _changes; a
        # publish notes the count before it scans, so _covered = (changes, number) says
        # which writes the generation last published certainly carries (see ticket()).
        self._changes = 0
        self._covered = (0, 0)
        self._covered_epoch: int | None = None  # the epoch _covered was published under
        self._next_rescan = 0.0
        self._store_due = 0.0
        self._chunks_due = 0.0

    # -- what the rest of the instance asks ----------------------------------------------------

    def gate_reason(self) -> str | None:
        """Why leader-only work must wait (a new leader catching up), else None."""
        epoch = self.elector.epoch
        if epoch is None:
            return None
        if self.lead_epoch != epoch or not self.caught_up:
            if self._behind:
                return (
                    f"the leader lacks generation {self._behind} and no member that has it "
                    "is reachable: leader-only work waits (start a member that applied it, "
                    f"or run 'ced cluster adopt-local {self.me}' to accept the loss)"
                )
            return "the leader is catching up with the published generation; retry shortly"
        return None

    @property
    def behind(self) -> bool:
        """This leader lacks an acknowledged generation and waits for a member that has it."""
        return bool(self._behind)

    def known_acked(self) -> int:
        """The newest generation acknowledged to an operator: the sealed etcd record or the
        mark on this disk, whichever is newer (a writer that deletes the record cannot make
        a leader forget it); the record, when newer, is kept on disk too. Raises when the
        record cannot be read."""
        from dispatcher.ha.sync import adopt

        stored = adopt.acked(self.backend, self.records)
        mark = self.acked_mark
        if mark is None:
            return stored
        mark.note(stored)
        return max(stored, mark.generation)

    def _acked_beyond(self, mine: int) -> bool:
        """A generation newer than ``mine`` was acknowledged to an operator (or the record
        cannot be read: assume so). A newer one never acknowledged may be superseded."""
        try:
            return self.known_acked() > mine
        except Exception:
            return True

    def _adopted(self, generation: int) -> bool:
        """An operator accepted this leader's files over ``generation`` (``ced cluster
        adopt-local``: a record sealed with the cluster key, for this instance)."""
        from dispatcher.ha.sync import adopt

        return adopt.granted(self.backend, self.records, self.me, generation)

    def published_current(self) -> bool:
        """Leading, caught up, and the files are exactly the generation last published."""
        epoch = self.elector.epoch
        if epoch is None or self.lead_epoch != epoch or not self.caught_up:
            return False
        with self._lock:
            dirty = self._dirty
        g = self.state.applied
        if dirty or self.active_operations() or g is None or g.epoch != epoch:
            return False
        return manifest_hash(self.scanner.scan()) == g.manifest_sha256

    def mark_dirty(self, _path: object = None) -> None:
        with self._lock:
            self._dirty = True
            self._changes += 1
            self._last_change = self._clock()

    def ticket(self) -> int:
        """The writes made so far (each counted once it is on disk). A generation carries
        them all once :meth:`covered` reaches this ticket: a publish that was already
        scanning when a change was written does not count for that change."""
        with self._lock:
            return self._changes

    def covered(self) -> tuple[int, int]:
        """``(ticket, generation)``: the newest published generation and the writes its
        scan certainly saw (every write counted before the scan began)."""
        with self._lock:
            return self._covered

    def covered_in(self, epoch: int) -> tuple[int, int] | None:
        """:meth:`covered`, counting only generations published under ``epoch``; None once
        this instance no longer leads under it. A write made under an epoch that ended may
        have been wiped since (the instance applied another leader's generation before it
        led again): no later generation of a new epoch vouches for it."""
        with self._lock:
            if self._covered_epoch == epoch:
                return self._covered
        return (0, 0) if self.elector.epoch == epoch else None

    def publish_soon(self) -> None:
        """A leader-only operation ended and waits for its generation: publish as soon
        as no operation is active, without the debounce meant for bursts of hand edits, and
        even when the files did not change (a rewrite with the same bytes), so the waiter
        always gets a generation to count acknowledgements on."""
        self._soon.set()

    def step_down(self) -> None:
        self.lead_epoch = None
        self.caught_up = False
        if self.pusher is not None:
            self.pusher.forget()
            self.pusher.reap(0)
        with self._lock:
            self._covered = (0, 0)  # a waiter counts only generations this epoch published
            self._covered_epoch = None

    # -- the leader loop -----------------------------------------------------------------------

    def step(self, epoch: int) -> None:
        now = self._clock()
        if self.pusher is not None:
            self.pusher.reap()
        if epoch != self.lead_epoch:
            self.lead_epoch = epoch
            self.caught_up = False
            if self.pusher is not None:
                self.pusher.forget()
            self._catch_up_deadline = now + self.catch_up_limit
            self._published_rev = 0
            self._own_head = None
            with self._lock:
                self._covered = (0, 0)
                self._covered_epoch = None
        if not self.caught_up:
            self.catch_up(epoch)
            return
        with self._lock:
            dirty, last = self._dirty, self._last_change
        soon = self._soon.is_set()
        quiet = self.active_operations() == 0 and (soon or now - last >= self.DEBOUNCE)
        if soon and quiet:  # someone waits for a generation: one comes even if nothing changed
            self._soon.clear()
            self.publish(epoch, force=True)
        elif (dirty and quiet) or now >= self._next_rescan:
            self.publish(epoch)
        elif not self._stop.is_set():
            self._soon.wait(0.03)

    def catch_up(self, epoch: int) -> None:
        """When the published generation is not the one the local files hold, fetch it from
        the members that applied it; if none can serve it within the catch-up limit, publish
        this instance's files (``sync-diverged``). Then publish N+1 under this epoch."""
        kv = self.backend.get_kv(self.key)
        self.health.mark_ok()
        if kv is None and not self.records.signer.available:
            self.records.create_key()  # the first leader of a new cluster makes the key
        if kv is not None and not self.records.signer.available:
            self.apply(kv.value, as_leader=True)  # fetches the key from a verified member
            if not self.records.signer.available:  # nothing can be sealed: stay gated
                self._stop.wait(0.5)
                return
        store_g: Generation | None = None
        if kv is not None:  # a record that fails verification is no generation at all
            try:
                store_g = self.gstore.decode(kv.value, kv.mod_rev)
            except ManifestError as exc:  # chunks altered or lost: nobody can apply it
                head = self.gstore.head(kv.value, kv.mod_rev)
                files = self.scanner.scan()
                if head is not None and head.manifest_sha256 == manifest_hash(files):
                    store_g = dataclasses.replace(head, files=files)  # ours: repaired below
                ev("sync-refused", logging.WARNING, instance=self.me, reason=f"malformed: {exc}")
        if self.mode == "push":
            verdict = self._against_acked(store_g)
            if verdict == "wait":
                self._wait_behind(epoch, self._behind, head_missing=True)
                return
            if verdict == "own":  # never applied over files holding a newer acked generation
                store_g = None
        if store_g is not None and self.mode == "push":
            mh = manifest_hash(self.scanner.scan())
            if mh != store_g.manifest_sha256:
                if not self.apply(kv.value if kv else b"", as_leader=True):
                    if self._clock() < self._catch_up_deadline:
                        self._stop.wait(0.3)
                        return
                    mine = self.state.applied.number if self.state.applied is not None else 0
                    behind = mine < store_g.number
                    if behind and self._acked_beyond(mine) and not self._adopted(store_g.number):
                        # Publishing our files now would erase changes acknowledged in the
                        # generations we never applied: wait for a member that has them.
                        self._wait_behind(epoch, store_g.number)
                        return
                    ev("sync-diverged", logging.WARNING, instance=self.me, epoch=epoch,
                       generation=store_g.number,
                       reason="no member serves the published generation; publishing this "
                              "instance's files instead" + (
                                  " (nothing newer than its own was acknowledged, or an "
                                  "operator adopted its files)" if behind else
                                  " (it holds that generation, plus unpublished changes)"))  # fmt: skip
            elif self.state.applied is None or self.state.applied.number != store_g.number:
                self.state.record(store_g)
        swept = self.gstore.sweep(epoch, store_g.chunks if store_g is not None else ())
        self.caught_up = True
        self._behind = 0
        ev("sync-leader-ready", swept_chunks=swept, instance=self.me, epoch=epoch,
           generation=store_g.number if store_g else 0)  # fmt: skip
        self.publish(epoch, force=True)
        if self.state.applied is not None:
            self.gstore.repair(epoch, self.state.applied)
            self._chunks_due = self._clock() + self.CHUNK_CHECK

    def _against_acked(self, store_g: Generation | None) -> str:
        """``"usual"``: the head is at least the newest acknowledged generation (catch-up
        fetches it as always). Otherwise the head was deleted or replaced by an older
        sealed one: ``"own"`` when this leader's files hold that generation (they are
        published over the head, never the head applied over them), ``"wait"`` (the
        generation in :attr:`_behind`) when they are older too, unless an operator
        adopted this leader's files."""
        head = store_g.number if store_g is not None else 0
        try:
            known = self.known_acked()
        except Exception:  # unreadable: the mark on disk alone
            known = self.acked_mark.generation if self.acked_mark is not None else 0
        if known <= head:
            return "usual"
        mine = self.state.applied.number if self.state.applied is not None else 0
        if mine >= known:
            ev("sync-refused", logging.WARNING, instance=self.me, head=head, acked=known,
               applied=mine, reason="the published head is missing or older than the newest "
               "acknowledged generation, which this leader holds: publishing its files")  # fmt: skip
            return "own"
        if self._adopted(head):
            return "own"
        self._behind = known
        return "wait"

    def _wait_behind(self, epoch: int, generation: int, head_missing: bool = False) -> None:
        """Leader-only work waits: a generation this leader lacks was acknowledged. Without
        a head to fetch it by, a live member that applied it is handed the leadership."""
        self._behind = generation
        now = self._clock()
        if now >= self._behind_logged + 30:
            self._behind_logged = now
            ev("sync-behind", logging.ERROR, instance=self.me, epoch=epoch,
               generation=generation,
               applied=self.state.applied.number if self.state.applied else 0,
               head="missing or older" if head_missing else "present",
               reason="no member that applied the acknowledged generation is "
                      "reachable; leader-only work waits for one (or for "
                      f"'ced cluster adopt-local {self.me}')")  # fmt: skip
        if head_missing and now >= self._catch_up_deadline:
            holders = sorted((m for m in self.members()
                              if m.instance_id != self.me and m.generation >= generation
                              and m.state == "serving"),
                             key=lambda m: (-m.generation, m.instance_id))  # fmt: skip
            if holders:
                to = holders[0].instance_id
                ev("sync-handover", logging.WARNING, instance=self.me, epoch=epoch, to=to,
                   generation=generation, reason=f"{to} applied the acknowledged generation "
                   "this leader lacks, and no head names it: it takes over")  # fmt: skip
                self.elector.resign(reason="sync-behind", to=to)
                return
        self._stop.wait(0.5)

    def publish(self, epoch: int, force: bool = False) -> Generation | None:
        """Publish the local files as a new generation if they changed (or ``force``)."""
        now = self._clock()
        with self._lock:
            self._dirty = False
            seen = self._changes  # every write counted here is on disk before the scan
        self._next_rescan = now + self.RESCAN
        files = self.scanner.scan()
        mh = manifest_hash(files)
        mine = self.state.applied
        same = mine is not None and mine.manifest_sha256 == mh and mine.epoch == epoch
        if not force and same and now < self._store_due:
            self._cover(seen, mine)  # the published generation holds exactly these files
            return None  # nothing changed; the store is checked every STORE_CHECK s
        current: Generation | None = None
        own = self._own_head
        if now < self._store_due and own is not None and own.epoch == epoch:
            # the store was read less than STORE_CHECK s ago and held this leader's head:
            # publish over it without reading it again (one etcd round trip less on the
            # path of every acknowledged change). Only this epoch's leader can write the
            # head (fenced); a head altered by a writer without the cluster key is read
            # and replaced at the next check, as before.
            ours, current = True, own
        else:
            self._store_due = now + self.STORE_CHECK
            kv = self.backend.get_kv(self.key)
            ours = kv is not None and kv.mod_rev == self._published_rev
            if kv is not None:
                current = self.gstore.head(kv.value, kv.mod_rev)  # number and chunk names
            self._own_head = current if ours else None
        if not force and ours and mine is not None and mine.manifest_sha256 == mh:
            if now >= self._chunks_due:  # chunks altered or deleted in the store: rewrite
                self._chunks_due = now + self.CHUNK_CHECK
                fixed = self.gstore.repair(epoch, mine)
                if fixed:
                    ev("generation-repair", logging.WARNING, generation=mine.number,
                       chunks=fixed, instance=self.me,
                       reason="chunks in the store did not match their names")  # fmt: skip
            self._cover(seen, mine)
            return None
        store_n = current.number if current is not None else 0
        marked = self.acked_mark.generation if self.acked_mark is not None else 0
        # above every acknowledged generation too (a head deleted, then adopt-local)
        number = max(store_n, mine.number if mine is not None else 0, marked) + 1
        g = Generation(number, epoch, self.me, mh, files, time.time(), self.mode)
        certs = mine is None or _material_paths(mine) != _material_paths(g)
        detail = {"generation": number, "manifest_sha256": mh, "files": len(files)}
        self.state.pending = g  # served to followers from the moment the txn commits
        try:
            self._own_head = None  # unknown until the transaction answers
            self._published_rev = self.gstore.publish(self.elector, epoch, g, current, detail)
            self._own_head = self.gstore.last_published  # the head with its chunk names
            self._push(g, mine)
            self._cover(seen, g)  # a waiter counts members now; the leader counts itself
            self.state.record(g)  # applied.json and this member's record
        finally:
            self.state.pending = None
        reason = "forced" if force else ("store-changed" if not ours else "files-changed")
        ev("generation-publish", generation=number, epoch=epoch, files=len(files),
           manifest=mh[:16], bytes=self.gstore.last_write.get("bytes", 0), reason=reason,
           certs_changed=certs, instance=self.me)  # fmt: skip
        return g

    def _push(self, g: Generation, before: Generation | None) -> None:
        """Send the followers ``g`` with the files that changed since ``before`` (read back
        and checked against the manifest: a file edited since the scan is left out and
        fetched); in the background, never failing the publish."""
        if self.pusher is None or self.mode != "push":
            return
        try:
            old = before.files if before is not None else {}
            files: dict[str, bytes] = {}
            for path, e in g.files.items():
                if old.get(path) == e or e.size > self.pusher.MAX_FILES_BYTES:
                    continue
                data = self.scanner.layout.local(path).read_bytes()
                if len(data) == e.size and hashlib.sha256(data).hexdigest() == e.sha256:
                    files[path] = data
            self.pusher.push(g, self.gstore.last_head, self._published_rev,
                             self.gstore.last_new, files)  # fmt: skip
        except Exception as exc:  # the followers' watch brings the generation anyway
            ev("sync-push", logging.WARNING, generation=g.number, error=exc)

    def _cover(self, seen: int, g: Generation | None) -> None:
        if g is None:
            return
        with self._lock:
            if self._covered_epoch != g.epoch:
                self._covered, self._covered_epoch = (0, 0), g.epoch
            self._covered = max(self._covered, (seen, g.number))


def _material_paths(g: Generation) -> dict[str, str]:
    return {p: e.sha256 for p, e in g.files.items()
            if p.endswith((".crt", ".key", "pki/cert", "pki/key", "pki/ca"))}  # fmt: skip
