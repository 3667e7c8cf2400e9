"""The generation this instance runs: ``<state_dir>/sync/applied.json``.

Recorded only after a generation is fully in place (a swap, a publish, or a catch-up that
found the files already matching), so a restarted follower whose files no longer match the
record diffs again and converges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.common import logfmt
from agent.common.fsutil import atomic_write
from dispatcher.ha.manifest import Generation, ManifestError, Scanner, manifest_hash

ev = logfmt.event


class SyncError(Exception):
    """A generation could not be applied now (the follower retries)."""


class AppliedState:
    """The applied generation (in memory and on disk) and whether a first sync happened."""

    def __init__(self, state_dir: str, me: str, on_record: Callable[[], None]) -> None:
        self.path = Path(state_dir) / "sync" / "applied.json"
        self.me = me
        self.on_record = on_record  # the coordinator refreshes the member key
        self.applied: Generation | None = None
        self.synced_once = False

    @property
    def number(self) -> int:
        g = self.applied
        return g.number if g is not None else 0

    def load(self, scanner: Scanner, check_files: bool) -> None:
        """The recorded generation, trusted only while the files still match it."""
        try:
            g = Generation.from_json(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ManifestError) as exc:
            ev("sync-state", logging.WARNING, path=self.path, error=exc)
            return
        if check_files and manifest_hash(scanner.scan()) != g.manifest_sha256:
            ev("sync-state", logging.WARNING, generation=g.number,
               reason="local files differ from the recorded generation; will sync again")  # fmt: skip
            return
        self.applied = g

    def record(self, g: Generation, **detail: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, g.to_json(), 0o600)
        self.applied = g
        self.synced_once = True
        self.on_record()
        if detail:
            ev("sync-applied", generation=g.number, epoch=g.epoch, leader=g.leader,
               instance=self.me, **detail)  # fmt: skip
