"""``ced cluster adopt-local INSTANCE``: the operator accepts a leader's own files.

A new leader that lacks the published generation waits for a member that applied it
(publishing its own older files would erase acknowledged changes). When no such member
will ever come back (its disks are gone), an operator may accept the loss: this record,
sealed with the cluster key and bound to the instance and the generation it lacks, lets
that leader publish its files. It is single-purpose: a later generation needs a new one.
"""

from __future__ import annotations

import time

from cluster.backend import KVBackend
from dispatcher.ha.records import Records

KIND = "adopt"


def key(backend: KVBackend, instance_id: str) -> str:
    return f"{backend.keys.prefix}adopt/{instance_id}"


def grant(backend: KVBackend, records: Records, instance_id: str, generation: int,
          requested_by: str) -> None:  # fmt: skip
    k = key(backend, instance_id)
    backend.put_value(k, records.seal(KIND, k, {
        "instance_id": instance_id, "generation": generation, "requested_by": requested_by,
        "at": time.time()}))  # fmt: skip


def granted(backend: KVBackend, records: Records, instance_id: str, generation: int) -> bool:
    k = key(backend, instance_id)
    raw = backend.get_value(k)
    if raw is None:
        return False
    body = records.open_dict(KIND, k, raw)
    return body is not None and body.get("generation") == generation


# ----- the newest acknowledged generation ----------------------------------------------------

ACKED = "acked"


def acked_key(backend: KVBackend) -> str:
    return f"{backend.keys.prefix}acked"


def acked(backend: KVBackend, records: Records) -> int:
    """The newest generation acknowledged to an operator (0: none on record). A leader
    that lacks it must wait for a member that has it; a newer generation that was never
    acknowledged may be superseded (nobody was told it was kept)."""
    k = acked_key(backend)
    raw = backend.get_value(k)
    if raw is None:
        return 0
    body = records.open_dict(ACKED, k, raw)
    try:
        return int(body.get("generation", 0)) if body is not None else 0
    except (TypeError, ValueError):
        return 0


def record_acked(backend: KVBackend, records: Records, generation: int,
                 known_newer: bool = False) -> None:  # fmt: skip
    """Remember that ``generation`` was acknowledged (kept if newer than the one on record;
    ``known_newer``: the caller knows it is, no read first)."""
    if not known_newer and generation <= acked(backend, records):
        return
    k = acked_key(backend)
    backend.put_value(k, records.seal(ACKED, k, {"generation": generation, "at": time.time()}))
