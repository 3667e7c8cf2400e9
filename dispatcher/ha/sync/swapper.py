"""Follower side: stage a generation's files next to their targets, then swap them in.

Each changed file is fetched (:mod:`dispatcher.ha.sync.fetcher`), written into a stage
directory next to its target (same filesystem, so the rename is atomic) and fsynced; only
when *every* file is staged is each renamed into place (keys first), then the files the
generation no longer has are removed, emptied directories pruned, the directories fsynced
and the whole manifest verified again. A crash leaves old files, new files or leftover stage
directories (removed at start), never a partial file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common import logfmt
from agent.common.fsutil import fsync_dir
from cluster.backend import MemberInfo
from dispatcher.ha.manifest import STAGE_DIR, Entry, Generation, Layout, Scanner
from dispatcher.ha.sync.fetcher import Conns, Fetcher
from dispatcher.ha.sync.state import SyncError

ev = logfmt.event


@dataclass
class Plan:
    """What applying a generation changes: every path mapped before anything is touched."""

    todo: list[Entry] = field(default_factory=list)  # fetch and swap in
    chmod: list[Entry] = field(default_factory=list)  # same content, other mode
    remove: list[str] = field(default_factory=list)  # not in the generation any more
    targets: dict[str, Path] = field(default_factory=dict)
    gone: dict[str, Path] = field(default_factory=dict)
    local: dict[str, Entry] = field(default_factory=dict)  # the scan the plan came from


class Swapper:
    MANY = 16  # staging more files than this: one syncfs per filesystem, not one fsync each

    def __init__(self, layout: Layout, scanner: Scanner, fetcher: Fetcher) -> None:
        self.layout = layout
        self.scanner = scanner
        self.fetcher = fetcher
        self._leftover = True  # stage directories may be left (start, or a failed apply)

    def clean_stage(self) -> None:
        """Remove leftover stage directories (a crash mid-apply, or the end of one)."""
        for d in self.layout.stage_dirs():
            shutil.rmtree(d, ignore_errors=True)
            ev("sync-stage-cleanup", path=d)

    def plan(self, g: Generation) -> Plan:
        local = self.scanner.scan()
        p = Plan(local=local)
        for path, e in sorted(g.files.items()):
            cur = local.get(path)
            if cur is None or cur.sha256 != e.sha256 or cur.size != e.size:
                p.todo.append(e)
            elif cur.mode != e.mode:
                p.chmod.append(e)
        p.remove = sorted(q for q in local if q not in g.files)
        p.targets = {e.path: self.layout.local(e.path) for e in p.todo + p.chmod}
        p.gone = {q: self.layout.local(q) for q in p.remove}
        return p

    def apply(self, g: Generation) -> dict[str, Any]:
        """Bring the local files to generation ``g``; a report for the ``sync-applied`` event."""
        if self._leftover:
            self.clean_stage()
            self._leftover = False
        p = self.plan(g)
        sources: list[str] = []
        staged: dict[str, Path] = {}
        if p.todo:
            self._leftover = True
            staged, sources = self._stage(g, p.todo, p.targets)
        self._swap(p, staged)
        self._leftover = False
        self._verify(g, p)
        return {"fetched": len(p.todo), "removed": len(p.remove), "chmod": len(p.chmod),
                "source": ",".join(sources) or "-"}  # fmt: skip

    def _verify(self, g: Generation, p: Plan) -> None:
        """Every file the swap touched is now the generation's, and the plan's scan with
        those changes is the generation's manifest (no full rescan: 20,000 records)."""
        after = dict(p.local)
        for e in p.todo + p.chmod:
            cur = self.scanner.entry(e.path, p.targets[e.path])
            if cur != e:
                raise SyncError(f"{e.path} differs from generation {g.number} after the swap")
            after[e.path] = e
        for q, path in p.gone.items():
            if os.path.lexists(path):
                raise SyncError(f"{q} is still here after the swap to generation {g.number}")
            after.pop(q, None)
        if after != g.files:  # g.files is verified against g.manifest_sha256
            raise SyncError(f"local files differ from generation {g.number} after the swap")

    def _swap(self, p: Plan, staged: dict[str, Path]) -> None:
        touched: set[Path] = set()
        # keys first: a reader between two renames then sees an old cert with a new key,
        # which every loader refuses and retries, rather than a new cert with an old key
        for e in sorted(p.todo, key=lambda e: (0 if ".key" in Path(e.path).name else 1, e.path)):
            os.replace(staged[e.path], p.targets[e.path])
            touched.add(p.targets[e.path].parent)
            # its content is the verified one: the rescan after the swap need not hash it
            self.scanner.known(p.targets[e.path], e.sha256)
        for e in p.chmod:
            os.chmod(p.targets[e.path], e.mode)
        for q in p.gone.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(q)
            touched.add(q.parent)
        for d in {q.parent for q in staged.values()}:  # the stage directories of this apply
            shutil.rmtree(d, ignore_errors=True)
        for d in sorted({q.parent for q in p.gone.values()}, key=lambda x: -len(x.parts)):
            self._prune_empty(d, touched)
        for d in touched:
            fsync_dir(d)

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
        """Fetch every file of ``todo`` and write it into its stage directory: up to
        :attr:`Fetcher.WORKERS` files at once, each worker on its own kept-alive
        connection (a generation's few changed files cost one round trip, not one each)."""
        sources = self.fetcher.sources(g)
        if not sources:
            raise SyncError(f"no member can serve generation {g.number}")
        each = len(todo) <= self.MANY
        for e in todo:
            sdir = targets[e.path].parent / STAGE_DIR
            sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lanes = min(self.fetcher.WORKERS, len(todo))
        share = [todo[i::lanes] for i in range(lanes)]
        staged: dict[str, Path] = {}
        used: list[str] = []
        src = _Sources(self.fetcher, g, sources)

        def lane(i: int) -> list[tuple[Entry, Path, str]]:
            conns = self.fetcher.lane(i)
            out = []
            for e in share[i]:
                data, who = src.fetch(conns, e)
                target = targets[e.path]
                out.append((e, _write_staged(target.parent / STAGE_DIR / target.name, data,
                                             e.mode, each), who))  # fmt: skip
            return out

        try:
            if lanes == 1:
                results = [lane(0)]
            else:
                with ThreadPoolExecutor(lanes, thread_name_prefix="ha-fetch") as pool:
                    results = list(pool.map(lane, range(lanes)))
        except BaseException:
            self.fetcher.close()  # the next attempt starts from fresh connections
            raise
        for e, path, who in (r for rs in results for r in rs):
            staged[e.path] = path
            if who not in used:
                used.append(who)
        if not each:
            _sync_filesystems(list(staged.values()))
        # no fsync of the stage directories: the renames are made durable by the fsync of
        # each target directory after the swap, and the contents were synced above
        return staged, used


class _Sources:
    """The members a generation's files are fetched from, shared by the fetch lanes: when
    a file cannot be fetched from them, the member records are read again once (they may
    be stale) and every lane goes on with the fresh list."""

    def __init__(self, fetcher: Fetcher, g: Generation, sources: list[MemberInfo]) -> None:
        self.fetcher = fetcher
        self.g = g
        self.sources = sources
        self.fresh = False
        self._lock = threading.Lock()

    def fetch(self, conns: Conns, e: Entry) -> tuple[bytes, str]:
        sources = self.sources
        try:
            return self.fetcher.fetch(sources, conns, e, self.g.number)
        except SyncError:
            with self._lock:
                if self.fresh and self.sources is sources:
                    raise
                if not self.fresh:
                    self.fresh = True
                    self.sources = self.fetcher.sources(self.g, fresh=True)
                sources = self.sources
        return self.fetcher.fetch(sources, conns, e, self.g.number)


def _write_staged(dest: Path, data: bytes, mode: int, fsync: bool = True) -> Path:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchmod(fd, mode)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return dest


def _sync_filesystems(paths: list[Path]) -> None:
    """Make the staged files durable: ``syncfs`` once per filesystem they are on (one
    journal commit instead of one per file), else ``fsync`` each."""
    by_dev: dict[int, Path] = {}
    for p in paths:
        by_dev.setdefault(os.lstat(p).st_dev, p)
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        syncfs = None
    for p in by_dev.values():
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if syncfs is not None and syncfs(fd) == 0:
                continue
        finally:
            os.close(fd)
        break
    else:
        return
    for p in paths:  # no syncfs here: one fsync per file
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
