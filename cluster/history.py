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

With a ``signer`` (:mod:`cluster.signing`; instances on etcd pass one) notes and terms are
sealed when written and verified when read: a forged note names no target (no deferral at
all), a forged term is skipped and deleted like one that does not parse. Without one (the
embedded store, or ``ced cluster history`` showing the record) a sealed record is read
unverified.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from cluster.backend import Backend
from cluster.signing import RecordRejected, RecordSigner

HANDOVER = "handover"  # record kinds
TERM = "term"

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


def _doc(raw: bytes | str | None, signer: RecordSigner | None = None, kind: str = "",
         key: str = "") -> dict[str, Any] | None:  # fmt: skip
    if not raw:
        return None
    if signer is not None:
        try:
            doc = signer.open(kind, key, raw)
        except RecordRejected:
            return None
        return doc if isinstance(doc, dict) else None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("body"), dict) and "mac" in doc:
        doc = doc["body"]  # sealed, read for display
    return doc if isinstance(doc, dict) else None


def seal(obj: Handover | Term, key: str, signer: RecordSigner | None) -> str:
    """The stored form of a note or term (sealed when there is a signer)."""
    if signer is None:
        return obj.to_json()
    return signer.seal(HANDOVER if isinstance(obj, Handover) else TERM, key, asdict(obj))


def parse_handover(raw: bytes | str | None, signer: RecordSigner | None = None,
                   key: str = "") -> Handover | None:  # fmt: skip
    doc = _doc(raw, signer, HANDOVER, key)
    if doc is None:
        return None
    try:
        return Handover(int(doc["epoch"]), str(doc["leader"]), str(doc["reason"]),
                        str(doc.get("to") or ""), str(doc.get("requested_by") or ""),
                        float(doc.get("at") or 0))  # fmt: skip
    except (TypeError, KeyError, ValueError):
        return None


def parse_term(raw: bytes | str | None, signer: RecordSigner | None = None,
               key: str = "") -> Term | None:  # fmt: skip
    doc = _doc(raw, signer, TERM, key)
    if doc is None:
        return None
    try:
        return Term(int(doc["term"]), int(doc["epoch"]), str(doc["leader"]),
                    str(doc["previous"]), int(doc["previous_epoch"]), str(doc["reason"]),
                    float(doc["at"]))  # fmt: skip
    except (TypeError, KeyError, ValueError):
        return None


def read_handover(backend: Backend, signer: RecordSigner | None = None) -> Handover | None:
    key = backend.keys.handover
    return parse_handover(backend.get_value(key), signer, key)


def terms(backend: Backend, signer: RecordSigner | None = None) -> list[Term]:
    """Every readable term on record, newest first."""
    out = [t for kv in backend.get_prefix(backend.keys.history)
           if (t := parse_term(kv.value, signer, kv.key))]  # fmt: skip
    return sorted(out, key=lambda t: t.epoch, reverse=True)


def takeover(
    backend: Backend, instance_id: str, epoch: int, now: float | None = None,
    signer: RecordSigner | None = None,
) -> tuple[Term, dict[str, str], list[str]]:  # fmt: skip
    """The term a new leader of ``epoch`` records, with the puts and deletes that record it
    (the handover note consumed, terms beyond :data:`KEEP` dropped)."""
    keys = backend.keys
    records = backend.get_prefix(keys.history)
    parsed = [(parse_term(kv.value, signer, kv.key), kv.key) for kv in records]
    known = sorted(((t, k) for t, k in parsed if t is not None),
                   key=lambda x: x[0].epoch, reverse=True)  # fmt: skip
    last = known[0][0] if known else None
    note = read_handover(backend, signer)
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
    deletes += [k for t, k in parsed if t is None][:50]
    if note is not None or backend.get_value(keys.handover) is not None:
        deletes.append(keys.handover)  # consumed, or forged
    key = keys.history_term(epoch)
    return term, {key: seal(term, key, signer)}, deletes
