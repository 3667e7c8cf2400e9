"""The generation in the store: a head under ``/<cluster>/generation`` and its manifest in
content-addressed chunks under ``/<cluster>/generation-chunks/<sha256>`` (the format is
:func:`~dispatcher.ha.manifest.encode_generation` / ``decode_generation``).

Publishing writes only the chunks the current head does not reference (one agent changed:
one chunk), then the head, each transaction fenced by the leader's epoch and kept within
etcd's defaults (``--max-txn-ops`` 128, ``--max-request-bytes`` 1.5 MiB): the chunks that
fit go in the head's own transaction; a first publish of a large manifest writes the rest
in fenced transactions before it. A chunk is never visible to a follower before the head
naming it, and chunks are immutable, so a follower reads either the old head with its
chunks or the new one. Chunks of the generation before the current one that the new head
no longer names are deleted with (or right after) the head: a follower still fetching the
previous generation finds its chunks. A new leader sweeps chunks no head names.

Readers keep the chunks of the last verified head in memory, so a new generation costs
them the head and the chunks that changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from cluster.backend import KVBackend
from cluster.election import Elector
from cluster.errors import Fenced
from cluster.signing import RecordRejected
from dispatcher.ha.manifest import (
    Entry,
    Generation,
    ManifestError,
    decode_generation,
    encode_generation,
)
from dispatcher.ha.records import GENERATION, Records


class GenerationStore:
    MAX_OPS = 100  # operations per transaction (etcd's default limit is 128)
    MAX_BYTES = 1 << 20  # bytes per transaction (etcd's default request limit is 1.5 MiB)
    MANY = 8  # more chunks to read than this: one prefix read instead of one read each

    def __init__(self, backend: KVBackend, records: Records) -> None:
        self.backend = backend
        self.records = records  # the head is sealed with the cluster key
        self.keys = backend.keys
        self._lock = threading.Lock()
        self._parsed: dict[str, list[Entry]] = {}  # rows of the last verified head's chunks
        self._older: set[str] = set()  # chunks of the head the current one replaced
        self.last_write: dict[str, int] = {}  # bytes and transactions of the last publish
        self.last_new: dict[str, bytes] = {}  # the chunks the last publish added
        self.last_head = b""  # the sealed head it wrote
        self.last_published: Generation | None = None

    # -- reading -------------------------------------------------------------------------------

    def chunks(self, shas: Sequence[str]) -> Mapping[str, bytes]:
        """The stored chunks named ``shas`` (unverified: the caller checks them)."""
        return self._get_chunks(shas)

    def _get_chunks(self, shas: Sequence[str]) -> Mapping[str, bytes]:
        have: dict[str, bytes] = {}
        missing = set(shas)
        if len(missing) > self.MANY:
            for kv in self.backend.get_prefix(self.keys.generation_chunks):
                sha = kv.key.rsplit("/", 1)[-1]
                if sha in missing:
                    have[sha] = kv.value
        else:
            for s in sorted(missing):
                value = self.backend.get_value(self.keys.generation_chunk(s))
                if value is not None:
                    have[s] = value
        return have

    def _open(self, raw: bytes, rev: int) -> str | None:
        """The head's payload once its seal verifies (None: rejected, logged once)."""
        body = self.records.open_dict(GENERATION, self.keys.generation, raw, f"@{rev}")
        return None if body is None else json.dumps(body)

    def head(self, raw: bytes, rev: int = 0) -> Generation | None:
        """The verified head alone (no files): number, epoch, manifest hash, chunk names;
        None when its seal or its format is refused (logged once)."""
        head = self._open(raw, rev)
        if head is None:
            return None
        try:
            return decode_generation(head)
        except ManifestError as exc:
            self.records.reject(RecordRejected(GENERATION, self.keys.generation,
                                               f"malformed: {exc}"), f"@{rev}")  # fmt: skip
            return None

    def decode(
        self, raw: bytes, rev: int = 0, given: Mapping[str, bytes] | None = None
    ) -> Generation | None:
        """The verified generation of the head ``raw`` (its chunks read as needed, each
        checked against its sha256 in the sealed head); None when the seal is refused,
        ManifestError when a chunk is missing or fails its check. ``given``: chunks at
        hand (pushed by the leader), used instead of reading them, checked the same way."""
        head = self._open(raw, rev)
        if head is None:
            return None
        with self._lock:
            parsed = dict(self._parsed)

        def get(shas: Sequence[str]) -> Mapping[str, bytes]:
            have = {s: given[s] for s in shas if given is not None and s in given}
            rest = [s for s in shas if s not in have]
            return {**have, **self._get_chunks(rest)} if rest else have

        g = decode_generation(head, get, parsed)
        with self._lock:
            self._parsed = parsed
        return g

    def read(self) -> Generation | None:
        """The published generation, verified (None when nothing is published)."""
        kv = self.backend.get_kv(self.keys.generation)
        return None if kv is None else self.decode(kv.value, kv.mod_rev)

    # -- publishing (leader) ---------------------------------------------------------------------

    def publish(
        self,
        elector: Elector,
        epoch: int,
        g: Generation,
        current: Generation | None,
        detail: Mapping[str, Any],
    ) -> int:
        """Write ``g`` (``current``: the head now in the store, or None); the revision."""
        head, chunks = self.records.seal_generation(self.keys.generation, g)
        present = set(current.chunks) if current is not None else set()
        new = {s: d for s, d in chunks.items() if s not in present}
        stale = sorted(s for s in self._older if s not in present and s not in chunks)
        batches = self._pack(new, len(head))
        for batch in batches[:-1]:
            self._fenced(epoch, {self.keys.generation_chunk(s): d for s, d in batch.items()})
        last = batches[-1] if batches else {}
        room = max(0, self.MAX_OPS - len(last) - 2)  # the head and the effect record
        puts: dict[str, str | bytes] = {self.keys.generation_chunk(s): d for s, d in last.items()}
        puts[self.keys.generation] = head
        rec = elector.commit(
            "generation-publish", puts=puts, epoch=epoch, detail=dict(detail),
            deletes=[self.keys.generation_chunk(s) for s in stale[:room]],
        )  # fmt: skip
        self._delete(epoch, stale[room:])
        self._older = present - set(chunks)
        self.last_head, self.last_new = head.encode(), new  # pushed to the followers
        self.last_published = dataclasses.replace(g, chunks=tuple(chunks))  # the head written
        self.last_write = {
            "bytes": len(head) + sum(len(d) for d in new.values()),
            "chunks_written": len(new),
            "chunks": len(chunks),
            "transactions": max(1, len(batches)) + (1 if stale[room:] else 0),
        }
        return rec.revision

    def repair(self, epoch: int, g: Generation) -> int:
        """Rewrite the chunks of ``g`` (published by this leader) that the store lost or
        holds altered (an etcd writer without the cluster key can do that: followers then
        refuse the generation, never apply it); how many were rewritten."""
        _head, chunks = encode_generation(g)
        stored = {
            kv.key.rsplit("/", 1)[-1]: kv.value
            for kv in self.backend.get_prefix(self.keys.generation_chunks)
        }
        bad = {
            s: d
            for s, d in chunks.items()
            if s not in stored or hashlib.sha256(stored[s]).hexdigest() != s
        }
        for batch in self._pack(bad, 0):
            self._fenced(epoch, {self.keys.generation_chunk(s): d for s, d in batch.items()})
        return len(bad)

    def sweep(self, epoch: int, keep: Sequence[str]) -> int:
        """A new leader: delete every chunk no head names (``keep``: the current head's)."""
        wanted = set(keep)
        gone = [
            sha
            for kv in self.backend.get_prefix(self.keys.generation_chunks)
            if (sha := kv.key.rsplit("/", 1)[-1]) not in wanted
        ]
        self._delete(epoch, gone)
        self._older = set()
        return len(gone)

    def _pack(self, chunks: Mapping[str, bytes], head: int) -> list[dict[str, bytes]]:
        budget = self.MAX_BYTES - head - 4096
        out: list[dict[str, bytes]] = []
        cur: dict[str, bytes] = {}
        size = 0
        for sha, data in sorted(chunks.items()):
            if cur and (len(cur) >= self.MAX_OPS - 3 or size + len(data) > budget):
                out.append(cur)
                cur, size = {}, 0
            cur[sha] = data
            size += len(data)
        if cur:
            out.append(cur)
        return out

    def _fenced(
        self, epoch: int, puts: Mapping[str, str | bytes], deletes: Sequence[str] = ()
    ) -> None:
        if not self.backend.fenced_commit(epoch, puts, deletes):
            raise Fenced("generation-publish", epoch)

    def _delete(self, epoch: int, shas: Sequence[str]) -> None:
        for i in range(0, len(shas), self.MAX_OPS):
            keys = [self.keys.generation_chunk(s) for s in shas[i : i + self.MAX_OPS]]
            self._fenced(epoch, {}, keys)
