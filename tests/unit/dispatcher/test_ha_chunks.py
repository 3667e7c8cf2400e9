"""The generation in the store: a small head, content-addressed manifest chunks, fenced
publication within etcd's transaction limits, garbage collection, refusal of bad chunks."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.backend import LocalBackend
from cluster.election import Elector
from cluster.errors import ClusterError
from cluster.signing import RecordSigner
from dispatcher.ha.manifest import (
    CHUNK_FILES,
    Entry,
    Generation,
    ManifestError,
    chunk_count,
    decode_generation,
    encode_generation,
    manifest_hash,
)
from dispatcher.ha.records import Records
from dispatcher.ha.sync.store import GenerationStore
from ops.lab.proc import wait_until

RECORDS = Records(RecordSigner(b"k" * 32), "test")


def registry(n: int, changed: int | None = None) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for i in range(n):
        path = f"registry/host-{i:06d}.json"
        body = f"{i}-{'changed' if i == changed else 'same'}".encode()
        out[path] = Entry(path, 0o644, len(body), hashlib.sha256(body).hexdigest())
    return out


def gen(files: dict[str, Entry], number: int = 1, epoch: int = 3) -> Generation:
    return Generation(number, epoch, "leader", manifest_hash(files), files, 1.0)


# ----- the format ------------------------------------------------------------------------------


def test_twenty_thousand_agents_fit_in_small_chunks_and_round_trip() -> None:
    files = registry(20_000)
    g = gen(files)
    head, chunks = encode_generation(g)
    assert chunk_count(20_000) == len(chunks) == 64
    assert len(head) < 8 * 1024  # the head stays small whatever the agent count
    assert max(len(c) for c in chunks.values()) < 64 * 1024
    assert sum(len(c) for c in chunks.values()) < 1024 * 1024
    back = decode_generation(head, lambda shas: chunks)
    assert back.files == files and back.number == 1 and back.epoch == 3
    only_head = decode_generation(head)
    assert only_head.files == {} and len(only_head.chunks) == 64


def test_one_changed_file_changes_one_chunk() -> None:
    _, before = encode_generation(gen(registry(5_000)))
    _, after = encode_generation(gen(registry(5_000, changed=4321), number=2))
    assert len(set(after) - set(before)) == 1
    # a new agent also touches one chunk only (buckets by path hash, not by position)
    grown = registry(5_000)
    grown["registry/zz-new.json"] = Entry("registry/zz-new.json", 0o644, 1, "a" * 64)
    _, more = encode_generation(gen(grown, number=3))
    assert len(set(more) - set(before)) == 1
    assert chunk_count(CHUNK_FILES) == 1 and chunk_count(CHUNK_FILES + 1) == 2


def test_a_chunk_failing_its_hash_or_smuggling_a_path_is_refused() -> None:
    g = gen(registry(2_000))
    head, chunks = encode_generation(g)
    sha = sorted(chunks)[0]
    rows = json.loads(zlib.decompress(chunks[sha]))
    rows[0][3] = "0" * 64  # a file's hash swapped
    forged = dict(chunks)
    forged[sha] = zlib.compress(json.dumps(rows).encode())
    with pytest.raises(ManifestError, match="fails its hash check"):
        decode_generation(head, lambda shas: forged)
    with pytest.raises(ManifestError, match="missing"):
        decode_generation(head, lambda shas: {k: v for k, v in chunks.items() if k != sha})
    # a head naming chunks whose sha256 match, but whose rows do not make the manifest
    doc = json.loads(head)
    doc["manifest_sha256"] = "f" * 64
    with pytest.raises(ManifestError, match="does not match"):
        decode_generation(json.dumps(doc).encode(), lambda shas: chunks)
    # rows placed in the wrong chunk (a bucket the path does not hash to)
    a, b = doc["chunks"][0], doc["chunks"][1]
    doc = json.loads(head)
    doc["chunks"][0], doc["chunks"][1] = b, a
    with pytest.raises(ManifestError, match="foreign path"):
        decode_generation(json.dumps(doc).encode(), lambda shas: chunks)
    # a zip bomb: a chunk that inflates past the limit
    bomb = zlib.compress(b"[" + b" " * (20 * 1024 * 1024) + b"]")
    bsha = hashlib.sha256(bomb).hexdigest()
    doc = json.loads(head)
    doc["chunks"][0] = bsha
    with pytest.raises(ManifestError, match="inflates too far"):
        decode_generation(json.dumps(doc).encode(), lambda shas: {**chunks, bsha: bomb})
    for bad in (b"[]", b'{"format": 1}', b'{"format": 2, "generation": 1}'):
        with pytest.raises(ManifestError):
            decode_generation(bad)


# ----- the store ------------------------------------------------------------------------------


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[tuple[LocalBackend, Elector]]:
    backend = LocalBackend(tmp_path / "store")
    el = Elector(backend, "leader", ttl=5).start()
    try:
        wait_until(lambda: el.epoch is not None, 5, "the leader")
        yield backend, el
    finally:
        el.stop(resign=True)


def chunk_keys(backend: LocalBackend) -> set[str]:
    return {kv.key.rsplit("/", 1)[-1] for kv in backend.get_prefix(backend.keys.generation_chunks)}


def test_publish_writes_only_new_chunks_within_the_limits_and_collects_old_ones(
    leader: tuple[LocalBackend, Elector],
) -> None:
    backend, el = leader
    epoch = el.epoch
    assert epoch is not None
    store = GenerationStore(backend, RECORDS)
    store.MAX_BYTES = 48 * 1024  # as if etcd's limit were smaller: several transactions
    g1 = gen(registry(5_000), 1, epoch)
    store.publish(el, epoch, g1, None, {})
    assert store.last_write["chunks_written"] == 16 and store.last_write["transactions"] > 1
    reader = GenerationStore(backend, RECORDS)
    assert reader.read() == g1
    g2 = gen(registry(5_000, changed=5), 2, epoch)
    store.publish(el, epoch, g2, store.head(backend.get_value(backend.keys.generation)
                                            or b""), {})  # fmt: skip
    assert store.last_write["chunks_written"] == 1 and store.last_write["transactions"] == 1
    assert store.last_write["bytes"] < 20 * 1024
    assert reader.read() == g2
    g3 = gen(registry(5_000, changed=7), 3, epoch)
    store.publish(el, epoch, g3, g2, {})
    # generation 1's chunk that 2 replaced is gone; 2's (the previous) are still there
    c1, c2, c3 = (set(encode_generation(g)[1]) for g in (g1, g2, g3))
    assert chunk_keys(backend) == c2 | c3 and c1 - c2
    assert reader.read() == g3


def test_a_fenced_leader_writes_nothing(leader: tuple[LocalBackend, Elector]) -> None:
    backend, el = leader
    epoch = el.epoch
    assert epoch is not None
    store = GenerationStore(backend, RECORDS)
    store.MAX_BYTES = 16 * 1024

    with pytest.raises(ClusterError):
        store.publish(el, epoch - 1, gen(registry(5_000), 1, epoch - 1), None, {})
    assert backend.get_value(backend.keys.generation) is None and not chunk_keys(backend)


def test_a_new_leader_sweeps_chunks_no_head_names(leader: tuple[LocalBackend, Elector]) -> None:
    backend, el = leader
    epoch = el.epoch
    assert epoch is not None
    store = GenerationStore(backend, RECORDS)
    g = gen(registry(3_000), 1, epoch)
    store.publish(el, epoch, g, None, {})
    backend.put_value(backend.keys.generation_chunk("e" * 64), b"orphan")
    head = store.head(backend.get_value(backend.keys.generation) or b"")
    assert head is not None
    named = head.chunks
    assert set(named) == set(encode_generation(g)[1])
    assert GenerationStore(backend, RECORDS).sweep(epoch, named) == 1
    assert chunk_keys(backend) == set(named)


def test_a_follower_refuses_a_head_whose_chunk_fails_its_hash_once_and_keeps_its_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.unit.dispatcher.test_ha_sync import Rig, generation_of, populate

    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca", "agents/web1.json": b"{}"})
    assert rig.syncer.follower.handle(rig.put(generation_of(rig.leader_cfg, 1, 5)))
    populate(tmp_path / "leader", {"etc/ca.crt": b"forged"})
    head_raw, chunks = rig.leader_records.seal_generation(
        rig.backend.keys.generation, generation_of(rig.leader_cfg, 2, 5)
    )
    head = head_raw.encode()
    for sha, data in chunks.items():  # every chunk stored under its name, but altered
        rows = json.loads(zlib.decompress(data))
        rows[0][2] += 1
        rig.backend.put_value(rig.backend.keys.generation_chunk(sha),
                              zlib.compress(json.dumps(rows).encode()))  # fmt: skip
    for _ in range(3):
        assert not rig.syncer.follower.handle(head, rev=42)
    refusals = [r for r in caplog.records if "sync-refused" in r.getMessage()]
    assert len(refusals) == 1 and "hash check" in refusals[0].getMessage()
    assert (tmp_path / "follower" / "etc" / "ca.crt").read_bytes() == b"ca"
    assert rig.syncer.generation == 1 and rig.fetched == 2
    assert "hash check" in str(rig.syncer.sync_view()["error"])


def test_the_leader_rewrites_chunks_altered_or_lost_in_the_store(
    leader: tuple[LocalBackend, Elector],
) -> None:
    backend, el = leader
    epoch = el.epoch
    assert epoch is not None
    store = GenerationStore(backend, RECORDS)
    g = gen(registry(1_500), 1, epoch)
    store.publish(el, epoch, g, None, {})
    good = {kv.key: kv.value for kv in backend.get_prefix(backend.keys.generation_chunks)}
    assert store.repair(epoch, g) == 0
    victim, gone = sorted(good)[:2]
    backend.put_value(victim, zlib.compress(b"[]"))  # altered by an etcd writer
    backend.delete_value(gone)  # or deleted
    reader = GenerationStore(backend, RECORDS)
    with pytest.raises(ManifestError):
        reader.read()
    assert store.repair(epoch, g) == 2
    assert {kv.key: kv.value for kv in backend.get_prefix(backend.keys.generation_chunks)} == good
    assert reader.read() == g
