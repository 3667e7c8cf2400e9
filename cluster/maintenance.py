"""Maintenance mode: ``ced cluster pause`` / ``resume`` (Patroni's pause).

While ``/<cluster>/paused`` exists the leader starts no automatic work: no rolling
restart is ordered (one in progress finishes), no periodic maintenance (renewals,
rotation check, stale expiry) and no early retirement of the previous dispatcher serial.
Election, fencing, the data plane and operator-requested leader-only actions (approve,
deny, rotate-cert, ...) go on: pausing stops the cluster from acting by itself, not the
operator. The record says who paused it, when and why; it has no lease (it survives every
instance) and ``resume`` deletes it. A record that does not parse still counts as paused
(whoever could write it meant something) and shows as such.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from cluster.backend import Backend, KVBackend


@dataclass(frozen=True)
class Pause:
    by: str
    reason: str
    at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def read(backend: Backend) -> Pause | None:
    raw = backend.get_value(backend.keys.paused)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        return Pause(str(doc["by"]), str(doc["reason"]), float(doc["at"]))
    except (ValueError, TypeError, KeyError):
        return Pause("?", "unreadable pause record", 0.0)


def pause(backend: KVBackend, by: str, reason: str = "") -> Pause:
    p = Pause(by, reason, time.time())
    backend.put_value(backend.keys.paused, p.to_json())
    return p


def resume(backend: KVBackend) -> bool:
    """False when the cluster was not paused."""
    return backend.delete_value(backend.keys.paused)
