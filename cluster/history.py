"""Leadership history: who led when, and why leadership changed (Patroni's timeline).

Every new leader commits one :class:`Term` under ``/<cluster>/history/<epoch>`` right
after it took the lead, fenced under its epoch (so only epochs that really led, and could
still act, are on record): the term counter (previous term + 1, the number an operator talks about, beside
the etcd revision that is the epoch), the previous leader and epoch, and the reason.

A leader that gives up on purpose (SIGTERM, switchover, its own rolling restart) first
leaves a :class:`Handover` note under ``/<cluster>/handover`` (fenced under its epoch)
saying why and, for ``switchover --to``, to whom: the next leader takes its reason from
the note (and deletes it). Without a note for the previous epoch, the change was a
failover: the previous leader's lease ran out. While a note names a target, the other
members leave the campaign to it for :data:`HANDOVER_WAIT_TTLS` lease TTLs (each on its own
monotonic clock), so a switchover lands on the member asked for; if the target does not
take over in time, anyone may.

The newest :data:`KEEP` terms are kept. Records that do not parse are skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from cluster.backend import Backend

KEEP = 200  # newest terms kept in the store
HANDOVER_WAIT_TTLS = 2  # lease TTLs the others leave a handover target to take over


@dataclass(frozen=True)
class Handover:
    epoch: int  # the epoch that ends
    leader: str  # who resigns
    reason: str  # switchover, shutdown, restart, ...
    to: str = ""  # the member asked to take over ("" for anyone)
    requested_by: str = ""
    at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Term:
    term: int
    epoch: int
    leader: str
    previous: str  # the previous leader ("" for the first one on record)
    previous_epoch: int  # 0 for none
    reason: str
    at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _doc(raw: bytes | str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def parse_handover(raw: bytes | str | None) -> Handover | None:
    doc = _doc(raw)
    if doc is None:
        return None
    try:
        return Handover(int(doc["epoch"]), str(doc["leader"]), str(doc["reason"]),
                        str(doc.get("to") or ""), str(doc.get("requested_by") or ""),
                        float(doc.get("at") or 0))  # fmt: skip
    except (TypeError, KeyError, ValueError):
        return None


def parse_term(raw: bytes | str | None) -> Term | None:
    doc = _doc(raw)
    if doc is None:
        return None
    try:
        return Term(int(doc["term"]), int(doc["epoch"]), str(doc["leader"]),
                    str(doc["previous"]), int(doc["previous_epoch"]), str(doc["reason"]),
                    float(doc["at"]))  # fmt: skip
    except (TypeError, KeyError, ValueError):
        return None


def read_handover(backend: Backend) -> Handover | None:
    return parse_handover(backend.get_value(backend.keys.handover))


def terms(backend: Backend) -> list[Term]:
    """Every readable term on record, newest first."""
    out = [t for kv in backend.get_prefix(backend.keys.history) if (t := parse_term(kv.value))]
    return sorted(out, key=lambda t: t.epoch, reverse=True)


def takeover(
    backend: Backend, instance_id: str, epoch: int, now: float | None = None
) -> tuple[Term, dict[str, str], list[str]]:
    """The term a new leader of ``epoch`` records, with the puts and deletes that record it
    (the handover note consumed, terms beyond :data:`KEEP` dropped)."""
    keys = backend.keys
    records = backend.get_prefix(keys.history)
    known = sorted(((t, kv.key) for kv in records if (t := parse_term(kv.value))),
                   key=lambda x: x[0].epoch, reverse=True)  # fmt: skip
    last = known[0][0] if known else None
    note = read_handover(backend)
    if last is None:
        reason = "first leader on record"
    elif note is not None and note.epoch == last.epoch:
        reason = note.reason + (f" to {note.to}" if note.to else "")
        if note.requested_by:
            reason += f" (requested by {note.requested_by})"
    else:
        reason = f"failover: the lease of {last.leader} (epoch {last.epoch}) ended"
    term = Term((last.term if last else 0) + 1, epoch, instance_id,
                last.leader if last else "", last.epoch if last else 0, reason,
                time.time() if now is None else now)  # fmt: skip
    deletes = [key for _, key in known[KEEP - 1 :]][:50]
    deletes += [kv.key for kv in records if parse_term(kv.value) is None][:50]
    if note is not None:
        deletes.append(keys.handover)
    return term, {keys.history_term(epoch): term.to_json()}, deletes
