"""The generation this instance runs (``<state_dir>/sync/applied.json``) and the newest
epoch it has seen (``<state_dir>/sync/epoch.json``).

Recorded only after a generation is fully in place (a swap, a publish, or a catch-up that
found the files already matching), so a restarted follower whose files no longer match the
record diffs again and converges. The files are in place once swapped, so the generation
counts at once (in memory, the member key); when ``applied.json`` cannot be written (disk
full, read-only) the write is retried every tick of the sync thread (:meth:`flush`) until
it succeeds. The newest epoch is kept on disk so a restarted follower still refuses
generations and orders from an older epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.common import logfmt
from agent.common.errors import CtrlExecError
from agent.common.fsutil import atomic_write_json
from dispatcher.ha.manifest import Generation, ManifestError, Scanner, manifest_hash

ev = logfmt.event


def current_store(store_id: Callable[[], str] | None) -> str:
    """The etcd cluster id the marks on disk are tied to ("" when unknown or unreachable
    now: a mark is then judged by the id on disk alone)."""
    if store_id is None:
        return ""
    try:
        return store_id()
    except Exception:
        return ""


class SyncError(CtrlExecError):
    """A generation could not be applied now (the follower retries)."""


class AppliedState:
    """The applied generation (in memory, and on disk once the write succeeds)."""

    def __init__(self, state_dir: str, me: str, on_record: Callable[[], None]) -> None:
        self.path = Path(state_dir) / "sync" / "applied.json"
        self.me = me
        self.on_record = on_record  # the coordinator refreshes the member key
        self.applied: Generation | None = None
        # being published by this leader: its files may be fetched as soon as the
        # transaction commits, before it is recorded (see PeerFiles.serve)
        self.pending: Generation | None = None
        self.unsaved: Generation | None = None  # recorded, not yet written to applied.json
        self.write_error = ""

    @property
    def number(self) -> int:
        g = self.applied
        return g.number if g is not None else 0

    def load(self, scanner: Scanner, check_files: bool) -> None:
        """The recorded generation, trusted only while the files still match it (its file
        list is then the scan: the manifest hash covers every path, mode, size and sha256)."""
        try:
            raw = self.path.read_bytes()
            d = json.loads(raw)
            if isinstance(d, dict) and isinstance(d.get("files"), list):
                g = Generation.from_json(raw)  # a record written before the small format
            elif isinstance(d, dict):
                g = Generation(int(d["generation"]), int(d["epoch"]), str(d.get("leader", "")),
                               str(d["manifest_sha256"]), {}, float(d.get("published_at") or 0),
                               str(d.get("sync_mode") or "push"))  # fmt: skip
            else:
                raise ManifestError("applied.json is not an object")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ev("sync-state", logging.WARNING, path=self.path, error=exc)
            return
        files = scanner.scan()
        if manifest_hash(files) == g.manifest_sha256:
            g = dataclasses.replace(g, files=files)
        elif check_files:
            ev("sync-state", logging.WARNING, generation=g.number,
               reason="local files differ from the recorded generation; will sync again")  # fmt: skip
            return
        self.applied = g

    def record(self, g: Generation, save: bool = True, **detail: Any) -> None:
        """``g`` is in place: the member key, then ``applied.json`` (``save`` False: left
        to the sync thread's next :meth:`flush`, within its next tick)."""
        self.applied = g
        self.unsaved = g
        # the member key first: the leader counts it for ``sync_ack`` (the files are in
        # place and synced already; applied.json only saves a restart its diff)
        self.on_record()
        if save:
            self.flush()
        if detail:
            ev("sync-applied", generation=g.number, epoch=g.epoch, leader=g.leader,
               instance=self.me, **detail)  # fmt: skip

    def flush(self) -> bool:
        """Write the recorded generation to ``applied.json`` if not done yet; True when done.

        A failure is logged once (``sync-state``) and retried at the next call."""
        g = self.unsaved
        if g is None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _replace(self.path, _record(g))
        except OSError as exc:
            if not self.write_error:
                ev("sync-state", logging.WARNING, path=self.path, generation=g.number,
                   error=exc, reason="cannot record the applied generation; retrying")  # fmt: skip
            self.write_error = str(exc) or type(exc).__name__
            return False
        if self.unsaved is g:
            self.unsaved = None
        if self.write_error:
            ev("sync-state", path=self.path, generation=g.number, reason="recorded")
            self.write_error = ""
        return True


def _replace(path: Path, text: str) -> None:
    """Replace ``path`` atomically (temp file and rename), without fsync: a record lost in a
    crash only makes the restarted instance diff its files again (see :meth:`load`), and
    this write is on the path of every acknowledged change."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _record(g: Generation) -> str:
    """``applied.json``: the generation without its file list (the files on disk are it)."""
    return json.dumps({"generation": g.number, "epoch": g.epoch, "leader": g.leader,
                       "manifest_sha256": g.manifest_sha256, "published_at": g.published_at,
                       "sync_mode": g.sync_mode, "files": len(g.files)}, sort_keys=True)  # fmt: skip


class EpochRecord:
    """The newest epoch this instance has seen, kept on disk (``<state_dir>/sync/epoch.json``)
    with the identity of the store it came from: epochs of a rebuilt etcd (a new cluster id)
    start low again, so the kept one is forgotten then (DR: the instances rejoin)."""

    def __init__(self, state_dir: str, store_id: Callable[[], str] | None = None) -> None:
        self.path = Path(state_dir) / "sync" / "epoch.json"
        self._store_id = store_id
        self.store = ""
        self.saved = self._load()
        self._failed = False

    def _current_store(self) -> str:
        return current_store(self._store_id)

    def _load(self) -> int:
        try:
            d = json.loads(self.path.read_bytes())
            value = d["epoch"] if isinstance(d, dict) else None
            store = str(d.get("store", "")) if isinstance(d, dict) else ""
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError) as exc:
            ev("sync-state", logging.WARNING, path=self.path, error=exc)
            return 0
        epoch = value if isinstance(value, int) and value > 0 else 0
        current = self._current_store()
        if epoch and store and current and store != current:
            ev("sync-state", logging.WARNING, path=self.path, forgotten_epoch=epoch,
               reason=f"the store is a new one ({current}, was {store}): its epochs start "
                      "again")  # fmt: skip
            self.store = current
            return 0
        self.store = current or store
        return epoch

    def save(self, epoch: int) -> None:
        """Remember ``epoch`` if newer than the one on disk (retried at the next call)."""
        if epoch <= self.saved:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            store = self.store or self._current_store()
            atomic_write_json(self.path, {"epoch": epoch, "store": store}, 0o600)
            self.store = store
        except OSError as exc:
            if not self._failed:
                ev("sync-state", logging.WARNING, path=self.path, error=exc)
            self._failed = True
            return
        self.saved, self._failed = epoch, False


class AckedMark:
    """The newest generation this instance knows was acknowledged to an operator, kept on
    its disk (``<state_dir>/sync/acked.json``) with the identity of the store it belongs to.

    The sealed ``/<cluster>/acked`` record says the same in etcd, but a writer with etcd
    access can delete it (and the generation head): a new leader that lacks the
    acknowledged generation would then publish its older files over it. Every member keeps
    the mark it has seen (the leader when it acknowledges, followers when they read the
    record), so such a leader still waits (``sync-behind``). A rebuilt etcd (a new cluster
    id) starts its generations again: the mark of the old one is forgotten then."""

    def __init__(self, state_dir: str, store_id: Callable[[], str] | None = None) -> None:
        self.path = Path(state_dir) / "sync" / "acked.json"
        self._store_id = store_id
        self.store = ""
        self.generation = 0
        self._failed = False
        self._load()

    def _current_store(self) -> str:
        return current_store(self._store_id)

    def _load(self) -> None:
        try:
            d = json.loads(self.path.read_bytes())
            value = d.get("generation") if isinstance(d, dict) else None
            store = str(d.get("store", "")) if isinstance(d, dict) else ""
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            ev("sync-state", logging.WARNING, path=self.path, error=exc)
            return
        generation = value if isinstance(value, int) and value > 0 else 0
        current = self._current_store()
        if generation and store and current and store != current:
            ev("sync-state", logging.WARNING, path=self.path, forgotten_acked=generation,
               reason=f"the store is a new one ({current}, was {store}): its generations "
                      "start again")  # fmt: skip
            self.store = current
            return
        self.store = current or store
        self.generation = generation

    def note(self, generation: int) -> bool:
        """Keep ``generation`` if newer than the mark; False when it cannot be written now
        (the caller retries). Atomic, without fsync (as ``applied.json``): it is written
        on every acknowledged change, by the thread that applies generations."""
        if generation <= self.generation:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            store = self.store or self._current_store()
            _replace(self.path, json.dumps({"generation": generation, "store": store},
                                           sort_keys=True))  # fmt: skip
            self.store = store
        except OSError as exc:
            if not self._failed:
                ev("sync-state", logging.WARNING, path=self.path, generation=generation,
                   error=exc)  # fmt: skip
            self._failed = True
            return False
        self.generation, self._failed = generation, False
        return True
