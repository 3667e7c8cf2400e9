"""The one seam through which every write to shared dispatcher state goes.

Registry records, ``rotation.json``, the CA material and pairing approvals are written
through a :class:`StateWriter`. On one host it is :class:`LocalWriter` (atomic temp file,
fsync, rename). The HA issue swaps in a writer that first checks the leader's fencing
token, so a paused ex-leader cannot change anything.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from agent.common.fsutil import atomic_write, fsync_dir


class StateWriter(Protocol):
    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None: ...

    def delete(self, path: str | Path) -> bool: ...


class LocalWriter:
    """Atomic local writes; no fencing (single instance, or the embedded backend)."""

    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, mode)

    def delete(self, path: str | Path) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            fsync_dir(Path(path).parent)
        return True


@contextlib.contextmanager
def batched(writer: StateWriter) -> Iterator[None]:
    """The writer's batch when it has one (the fenced writer: the writes inside commit in
    one transaction when it ends, :meth:`dispatcher.ha.writer.FencedWriter.batch`), else
    nothing: each write is done at once. Use it only where the locks held cover what was
    read, and never read back inside what was written inside."""
    batch = getattr(writer, "batch", None)
    if batch is None:
        yield
        return
    with batch():
        yield


def write_json(writer: StateWriter, path: str | Path, obj: Any, mode: int = 0o644) -> None:
    writer.write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", mode)


_default: StateWriter = LocalWriter()


def default_writer() -> StateWriter:
    return _default


def set_default_writer(writer: StateWriter) -> None:
    global _default
    _default = writer
