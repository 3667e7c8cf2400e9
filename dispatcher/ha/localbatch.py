"""Several atomic local writes and deletes made durable together (a fenced batch's files).

One atomic write (:func:`agent.common.fsutil.atomic_write`) costs two ``fsync`` calls,
the file's and its directory's, each a journal commit; a batch of three writes one after
the other waits for six commits in a row, which on a busy disk (etcd syncing its log next
door) is most of an acknowledged change's time on the leader. Here every file is written
to its temporary name first, the temporary files are synced at once (concurrent ``fsync``
calls share journal commits), then the renames and deletes are done in the batch's order,
and each directory touched is synced once, again all at once. Readers see each file old
or new, never a part, as with one atomic write; when a step fails, the temporary files
left are removed and the error raised (the renames done so far stay, as a failure in a
row of single writes would leave them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.common.fsutil import fsync_dir

# (path, data or None to delete, mode)
Change = tuple[Path, bytes | str | None, int]

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(4, thread_name_prefix="ha-fsync")
    return _pool


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all(fn: Callable[[str], object], items: Sequence[str]) -> None:
    """``fn(item)`` for every item, concurrently when there are several."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    for f in [_executor().submit(fn, item) for item in items]:
        f.result()


def apply(changes: Sequence[Change]) -> list[bool]:
    """Write or delete each path in order, durably; per change, whether it did something
    (a delete of an absent file did nothing)."""
    temps: dict[int, str] = {}
    try:
        for i, (path, data, mode) in enumerate(changes):
            if data is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            raw = data.encode() if isinstance(data, str) else data
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps[i] = tmp
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), mode)
                fh.write(raw)
        _all(_fsync_file, list(temps.values()))
        done: list[bool] = []
        for i, (path, data, _mode) in enumerate(changes):
            if data is None:
                try:
                    os.unlink(path)
                    done.append(True)
                except FileNotFoundError:
                    done.append(False)
            else:
                os.replace(temps[i], path)
                del temps[i]
                done.append(True)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _all(fsync_dir, sorted({str(path.parent) for path, _d, _m in changes}))
    return done
