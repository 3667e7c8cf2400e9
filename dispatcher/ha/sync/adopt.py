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
