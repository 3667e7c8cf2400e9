"""The fenced :class:`~dispatcher.statewrite.StateWriter`: leader-only writes, epoch first.

Every write or delete of shared state (registry records, ``rotation.json``, pairing
decisions, CA material) goes through :class:`FencedWriter`. It refuses with
:class:`~dispatcher.errors.NotLeaderError` unless this instance leads, then commits an
effect record (effect name, path, sha256, epoch) through :meth:`Elector.commit` under the
epoch the operation began with, and only after that commit succeeded performs the atomic
local write. A paused or partitioned ex-leader therefore changes nothing: its commit
compares the leader key's create revision against its old epoch and is refused.

An *operation* groups writes under one epoch::

    with writer.operation("pairing-approve") as epoch:
        pairing_queue.approve(cfg, reqid, writer=writer)

The epoch is captured (and checked live against the store) when the operation begins;
a write inside it commits under exactly that epoch, so a leadership change in the middle
stops the rest of the operation. A write outside any operation is its own operation.
The current operation lives in a :class:`contextvars.ContextVar`, so it follows
``asyncio.to_thread`` into worker threads.

A *batch* folds several writes into one transaction::

    with registry.locked(), writer.batch():
        registry.register(name, ...)
        writer.write(approval, ...)

Inside it each write or delete is only staged (nothing in the store, nothing on disk);
when the batch ends, the effect records of all of them commit in **one** fenced
transaction (the same compare on the leader key's create revision: a paused or
partitioned ex-leader's batch is refused as a whole and writes nothing), and only then
are the files written and deleted, in order (synced together: :mod:`.localbatch`). A batch that raises commits and writes
nothing. Staged writes are not visible on disk until the batch ends, so a batch belongs
where the code holds the locks that cover what it read (above: the registry lock, so no
other writer updates the record in between) and never reads back what it wrote. More
than :attr:`FencedWriter.BATCH_MAX` writes commit in several transactions, each followed
by its files (as many writes in a row do without a batch). Batches nest (the outermost
commits).

Residual window (documented, bounded): between a successful commit and the local rename
the instance could lose the lease; the elector stops leading ``margin`` seconds before
the lease can expire, and a commit is only attempted while leading, so a newer leader
cannot exist yet at that point unless the process stalls for longer than that margin
between the commit and the rename.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common import logfmt
from cluster.election import Elector
from cluster.errors import BackendUnavailable, Fenced, NotLeader
from dispatcher.errors import ClusterUnavailableError, NotLeaderError
from dispatcher.ha import localbatch
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.statewrite import LocalWriter, StateWriter

_current: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "ctrl_exec_fenced_operation", default=None
)

LeaderHint = Callable[[], tuple[str | None, str | None]]


@dataclass(frozen=True)
class _Staged:
    """A write (``data``) or delete (``data`` None) of a batch, with its effect record."""

    effect: str
    epoch: int
    detail: dict[str, Any]
    path: Path
    data: bytes | str | None
    mode: int


_batch: contextvars.ContextVar[list[_Staged] | None] = contextvars.ContextVar(
    "ctrl_exec_fenced_batch", default=None
)


def _no_hint() -> tuple[str | None, str | None]:
    return None, None


class FencedWriter:
    """:class:`StateWriter` that commits every change as a fenced effect first."""

    PRUNE_EVERY = 200  # commits between two prunings of the effect history
    BATCH_MAX = 100  # effect records per transaction of a batch (etcd allows 128 operations)
    KEEP_EFFECTS = 2000  # newest effect records kept in the store

    def __init__(
        self,
        elector: Elector,
        *,
        health: ClusterHealth | None = None,
        local: StateWriter | None = None,
        effect_for: Callable[[Path], str] | None = None,
        leader_hint: LeaderHint | None = None,
        keep_effects: int | None = None,
        prune_every: int | None = None,
        on_change: Callable[[Path], None] | None = None,
        gate: Callable[[], str | None] | None = None,
    ) -> None:
        self.elector = elector
        self.keep_effects = self.KEEP_EFFECTS if keep_effects is None else keep_effects
        self.prune_every = self.PRUNE_EVERY if prune_every is None else prune_every
        self.health = health
        self.local = local or LocalWriter()
        self.effect_for = effect_for or (lambda _p: "state-write")
        self.leader_hint = leader_hint or _no_hint
        self.on_change = on_change  # after every local write or delete (generation publish)
        self.gate = gate  # a reason to refuse leader-only work for now (catching up), or None
        self._commits = 0
        self._count_lock = threading.Lock()
        self._active = 0

    # -- leadership ----------------------------------------------------------------------

    def epoch(self) -> int | None:
        """The epoch this instance leads under now (None when it does not lead)."""
        return self.elector.epoch

    def current_operation(self) -> tuple[str, int] | None:
        """``(name, epoch)`` of the operation this context runs in, if any."""
        return _current.get()

    def _unavailable(self, what: str, exc: BaseException | str) -> ClusterUnavailableError:
        if self.health is not None:
            self.health.mark_failed(exc)
        return ClusterUnavailableError(f"{what}: cluster unavailable ({exc})")

    def _not_leader(self, what: str, detail: str = "") -> NotLeaderError:
        leader_id, url = self.leader_hint()
        me = self.elector.instance_id
        msg = f"{what}: this instance ({me}) is not the leader"
        if detail:
            msg += f" ({detail})"
        if leader_id and leader_id != me:
            msg += f"; the leader is {leader_id}" + (f" at {url}" if url else "")
        if leader_id == me:
            leader_id, url = None, None
        return NotLeaderError(msg, leader_id, url)

    def active_operations(self) -> int:
        """Operations running right now (the generation publisher waits for none)."""
        with self._count_lock:
            return self._active

    def require(self, what: str) -> int:
        """The current epoch, or raise a clear error (cluster down, or not the leader)."""
        epoch = self.elector.epoch
        if epoch is not None:
            reason = self.gate() if self.gate is not None else None
            if reason:  # e.g. a new leader still catching up with the published generation
                raise ClusterUnavailableError(f"{what}: {reason}")
            return epoch
        if self.health is not None and not self.health.ok:
            raise self._unavailable(what, self.health.error or "store unreachable")
        raise self._not_leader(what)

    @contextlib.contextmanager
    def operation(self, name: str, *, verify: bool = True) -> Iterator[int]:
        """Run a leader-only operation under the epoch current now (yielded).

        With ``verify`` the leader key is read from the store first, so an instance cut
        off from etcd (or already replaced) fails before it starts any work.
        """
        epoch = self.require(name)
        if verify:
            try:
                info = self.elector.backend.leader()
            except BackendUnavailable as exc:
                raise self._unavailable(name, exc) from exc
            if info is None or info.epoch != epoch:
                raise self._not_leader(name, f"epoch {epoch} is no longer current")
        token = _current.set((name, epoch))
        log_token = logfmt.push_context(epoch=epoch)  # every line of the action names it
        logfmt.event("leader-op", op=name, phase="begin", instance=self.elector.instance_id)
        ok = False
        with self._count_lock:
            self._active += 1
        try:
            yield epoch
            ok = True
        finally:
            with self._count_lock:
                self._active -= 1
            _current.reset(token)
            logfmt.pop_context(log_token)
            logfmt.event("leader-op", logging.INFO if ok else logging.WARNING, op=name,
                         phase="end" if ok else "failed", epoch=epoch,
                         instance=self.elector.instance_id)  # fmt: skip

    # -- StateWriter ---------------------------------------------------------------------

    def _effect(self, path: Path) -> tuple[str, int, str]:
        """``(effect, epoch, kind)`` for a write of ``path`` in the current context."""
        kind = self.effect_for(path)
        op = _current.get()
        if op is not None:
            return op[0], op[1], kind
        return kind, self.require(kind), kind

    def _commit(self, effect: str, epoch: int, detail: dict[str, Any]) -> None:
        self._commit_all([(effect, epoch, detail)])

    def _commit_all(self, items: list[tuple[str, int, dict[str, Any]]]) -> None:
        """Commit the effect records of ``items`` (one epoch) in one fenced transaction."""
        effect, epoch = items[0][0], items[0][1]
        try:
            if any(e != epoch for _, e, _ in items):  # never: a batch keeps one epoch
                raise NotLeader(f"{effect}: writes of one batch under several epochs")
            if len(items) == 1:
                recs = [self.elector.commit(effect, detail=items[0][2], epoch=epoch)]
            else:
                recs = self.elector.commit_effects(epoch, [(e, d) for e, _, d in items])
        except Fenced as exc:
            raise self._not_leader(effect, f"fenced: epoch {epoch} is no longer current") from exc
        except NotLeader as exc:
            raise self._not_leader(effect, f"leadership of epoch {epoch} ended") from exc
        except BackendUnavailable as exc:
            raise self._unavailable(effect, exc) from exc
        for rec in recs:
            logfmt.event("leader-effect", effect=rec.effect, epoch=epoch, revision=rec.revision,
                         **{k: v for k, v in rec.detail.items() if k != "mode"})  # fmt: skip
        self._maybe_prune(epoch, len(recs))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Fold the writes and deletes made inside into one fenced transaction, committed
        (then written) when the outermost batch ends; nothing at all if it raises. See the
        module docstring."""
        if _batch.get() is not None:  # nested: the outermost batch commits
            yield
            return
        staged: list[_Staged] = []
        token = _batch.set(staged)
        try:
            yield
        finally:
            _batch.reset(token)
        self._flush(staged)  # not reached when the body raised: nothing committed

    def _flush(self, staged: list[_Staged]) -> None:
        for i in range(0, len(staged), self.BATCH_MAX):
            part = staged[i : i + self.BATCH_MAX]
            self._commit_all([(s.effect, s.epoch, s.detail) for s in part])
            if type(self.local) is LocalWriter:  # the files synced together, not one by one
                localbatch.apply([(s.path, s.data, s.mode) for s in part])
            else:
                for s in part:
                    if s.data is None:
                        self.local.delete(s.path)
                    else:
                        self.local.write(s.path, s.data, s.mode)
            for s in part:
                self._changed(s.path)

    def _exists(self, path: Path, staged: list[_Staged] | None) -> bool:
        """Whether ``path`` exists once the batch's staged writes are done."""
        for s in reversed(staged or []):
            if s.path == path:
                return s.data is not None
        return os.path.lexists(path)

    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
        p = Path(path)
        raw = data.encode() if isinstance(data, str) else data
        effect, epoch, kind = self._effect(p)
        detail = {"op": "write", "kind": kind, "path": str(p),
                  "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw),
                  "mode": f"{mode:o}"}  # fmt: skip
        staged = _batch.get()
        if staged is not None:
            staged.append(_Staged(effect, epoch, detail, p, data, mode))
            return
        self._commit(effect, epoch, detail)
        self.local.write(p, data, mode)
        self._changed(p)

    def delete(self, path: str | Path) -> bool:
        p = Path(path)
        effect, epoch, kind = self._effect(p)  # refuses on a follower even for absent files
        staged = _batch.get()
        if not self._exists(p, staged):
            return False
        detail: dict[str, Any] = {"op": "delete", "kind": kind, "path": str(p)}
        if staged is not None:
            staged.append(_Staged(effect, epoch, detail, p, None, 0))
            return True
        self._commit(effect, epoch, detail)
        done = self.local.delete(p)
        self._changed(p)
        return done

    def _changed(self, path: Path) -> None:
        if self.on_change is not None:
            try:
                self.on_change(path)
            except Exception as exc:  # the write is done; a publish problem is logged
                logfmt.event("generation-mark", logging.WARNING, path=path, error=exc)

    # -- history housekeeping --------------------------------------------------------------

    def _maybe_prune(self, epoch: int, records: int = 1) -> None:
        with self._count_lock:
            before = self._commits
            self._commits += records
            due = self._commits // self.prune_every > before // self.prune_every
        if due:
            self.prune(epoch)

    def prune(self, epoch: int, keep: int | None = None) -> int:
        """Delete the oldest effect records beyond ``keep``, fenced; returns how many."""
        keep = self.keep_effects if keep is None else keep
        try:
            effects = self.elector.backend.effects()
            old = [e.key for e in effects[: max(0, len(effects) - keep)]]
            for i in range(0, len(old), 100):
                self.elector.commit("effects-prune", deletes=old[i : i + 100],
                                    detail={"deleted": len(old[i : i + 100])},
                                    epoch=epoch)  # fmt: skip
        except (BackendUnavailable, NotLeader, Fenced) as exc:
            logfmt.event("effects-prune", logging.WARNING, epoch=epoch, error=exc)
            return 0
        return len(old)
