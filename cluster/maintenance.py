"""Maintenance mode: ``ced cluster pause`` / ``resume`` (Patroni's pause).

While ``/<cluster>/paused`` exists the leader starts no automatic work: no rolling
restart is ordered (one in progress finishes), no periodic maintenance (renewals,
rotation check, stale expiry) and no early retirement of the previous dispatcher serial.
Election, fencing, the data plane and operator-requested leader-only actions (approve,
deny, rotate-cert, ...) go on: pausing stops the cluster from acting by itself, not the
operator. The record says who paused it, when and why; it has no lease (it survives every
instance) and ``resume`` deletes it.

With a ``signer`` (:mod:`cluster.signing`; every instance on etcd passes one) the record
is sealed by ``pause`` and verified by ``read``: one that fails verification or does not
parse is no pause (``on_reject`` is told), so a store writer without the cluster key
cannot stop the cluster's automatic work (it can delete a genuine record: resume it, at
most). Without a signer (the embedded single-host store, or a display) a record that does
not parse counts as paused and shows as such.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cluster.backend import Backend, KVBackend
from cluster.signing import RecordRejected, RecordSigner

KIND = "paused"


@dataclass(frozen=True)
class Pause:
    by: str
    reason: str
    at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def read(backend: Backend, signer: RecordSigner | None = None,
         on_reject: Callable[[RecordRejected], None] | None = None) -> Pause | None:  # fmt: skip
    key = backend.keys.paused
    raw = backend.get_value(key)
    if raw is None:
        return None
    if signer is not None:
        try:
            doc = signer.open(KIND, key, raw)
            return Pause(str(doc["by"]), str(doc["reason"]), float(doc["at"]))
        except RecordRejected as exc:
            if on_reject is not None:
                on_reject(exc)
            return None
        except (ValueError, TypeError, KeyError):
            if on_reject is not None:
                on_reject(RecordRejected(KIND, key, "malformed pause record"))
            return None
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("body"), dict):
            doc = doc["body"]  # sealed: shown (not verified: no signer here)
        return Pause(str(doc["by"]), str(doc["reason"]), float(doc["at"]))
    except (ValueError, TypeError, KeyError):
        return Pause("?", "unreadable pause record", 0.0)


def pause(backend: KVBackend, by: str, reason: str = "", signer: RecordSigner | None = None
          ) -> Pause:  # fmt: skip
    p = Pause(by, reason, time.time())
    key = backend.keys.paused
    backend.put_value(key, signer.seal(KIND, key, asdict(p)) if signer else p.to_json())
    return p


def resume(backend: KVBackend) -> bool:
    """False when the cluster was not paused."""
    return backend.delete_value(backend.keys.paused)
