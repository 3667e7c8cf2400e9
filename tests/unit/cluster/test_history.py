"""Leadership history and maintenance mode on the embedded backend (real flock store)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cluster import history, maintenance
from cluster.backend import LocalBackend
from cluster.election import Elector

TTL = 1


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_terms_count_up_with_the_reason_of_each_change(tmp_path: Path) -> None:
    ba, bb = LocalBackend(tmp_path / "s"), LocalBackend(tmp_path / "s")
    a = Elector(ba, "a", ttl=TTL).start()
    try:
        wait_for(a.is_leader)
        wait_for(lambda: len(history.terms(ba)) == 1)
        first = history.terms(ba)[0]
        assert (first.term, first.leader, first.previous, first.reason) == (
            1, "a", "", "first leader on record")  # fmt: skip
        b = Elector(bb, "b", ttl=TTL).start()
        wait_for(lambda: b.last_leader is not None)
        a.resign(reason="switchover", to="b", requested_by="tester")
        wait_for(b.is_leader)
        wait_for(lambda: len(history.terms(ba)) == 2)
        second = history.terms(ba)[0]
        assert (second.term, second.leader, second.previous) == (2, "b", "a")
        assert second.previous_epoch == first.epoch < second.epoch
        assert second.reason == "switchover to b (requested by tester)"
        assert history.read_handover(ba) is None  # consumed by the new leader
        b.stop(resign=False)  # b dies without a word: its lease runs out
        bb.close()
        wait_for(a.is_leader, timeout=10)
        wait_for(lambda: len(history.terms(ba)) == 3, timeout=10)
        third = history.terms(ba)[0]
        assert (third.term, third.leader, third.previous) == (3, "a", "b")
        assert third.reason == f"failover: the lease of b (epoch {second.epoch}) ended"
    finally:
        a.stop(resign=True, timeout=3)
        ba.close()


def test_unreadable_records_are_skipped_and_dropped(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "s")
    try:
        b.put_value(b.keys.history + "junk", "{not json")
        b.put_value(b.keys.handover, "[]")
        assert history.terms(b) == [] and history.read_handover(b) is None
        term, puts, deletes = history.takeover(b, "a", 42)
        assert term.term == 1 and list(puts) == [b.keys.history_term(42)]
        assert b.keys.history + "junk" in deletes
    finally:
        b.close()


def test_pause_and_resume(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "s")
    try:
        assert maintenance.read(b) is None and maintenance.resume(b) is False
        p = maintenance.pause(b, "ced:alice@h1", "etcd upgrade")
        assert maintenance.read(b) == p
        assert maintenance.resume(b) is True and maintenance.read(b) is None
        b.put_value(b.keys.paused, "garbage")
        assert maintenance.read(b) == maintenance.Pause("?", "unreadable pause record", 0.0)
    finally:
        b.close()


def test_forged_handover_notes_delay_a_failover_but_never_prevent_it(tmp_path: Path) -> None:
    """Whoever can write to the store may keep writing notes naming a member that never
    comes: the others defer at most HANDOVER_WAIT_TTLS TTLs, then one of them leads."""
    import threading

    ba, bb, bw = (LocalBackend(tmp_path / "s") for _ in range(3))
    a = Elector(ba, "a", ttl=TTL).start()
    stop = threading.Event()
    try:
        wait_for(a.is_leader)
        b = Elector(bb, "b", ttl=TTL).start()
        wait_for(lambda: b.last_leader is not None)

        def forge() -> None:
            n = 10**12
            while not stop.is_set():
                n += 1
                note = history.Handover(n, "a", "switchover", to="ghost", at=time.time())
                bw.put_value(bw.keys.handover, note.to_json())
                time.sleep(0.05)

        threading.Thread(target=forge, daemon=True).start()
        time.sleep(0.3)
        # the leader dies without a note of its own (an embedded lease is a flock of its
        # process: closing the store frees it, as a crash would): the newest note is always
        # a forged one naming a ghost
        a.stop(resign=False, timeout=3)
        ba.close()
        t0 = time.monotonic()
        wait_for(b.is_leader, timeout=(history.HANDOVER_WAIT_TTLS + 3) * TTL + 2)
        took = time.monotonic() - t0
        assert took >= history.HANDOVER_WAIT_TTLS * TTL * 0.8, took  # it deferred
        b.stop(resign=True, timeout=3)
    finally:
        stop.set()
        for x in (ba, bb, bw):
            x.close()


def test_with_a_signer_notes_terms_and_pauses_are_sealed_and_forgeries_ignored(
    tmp_path: Path,
) -> None:
    from cluster.signing import RecordSigner

    signer, forger = RecordSigner(b"s" * 32), RecordSigner(b"f" * 32)
    ba, bb = LocalBackend(tmp_path / "s"), LocalBackend(tmp_path / "s")
    a = Elector(ba, "a", ttl=TTL, signer=signer).start()
    try:
        wait_for(a.is_leader)
        wait_for(lambda: len(history.terms(ba, signer)) == 1)
        # a forged note naming a target: no member defers to it (not even 2 TTLs)
        kh = ba.keys.handover
        note = history.Handover(10**12, "a", "switchover", to="ghost", at=time.time())
        ba.put_value(kh, forger.seal("handover", kh, {**note.__dict__}))
        assert history.read_handover(ba, signer) is None
        assert history.read_handover(ba) is not None  # unverified display still reads it
        b = Elector(bb, "b", ttl=TTL, signer=signer).start()
        wait_for(lambda: b.last_leader is not None)
        a.stop(resign=False)
        ba.close()
        t0 = time.monotonic()
        wait_for(b.is_leader, timeout=10)
        assert time.monotonic() - t0 < (history.HANDOVER_WAIT_TTLS + 0.5) * TTL  # no deferral
        # a forged term is skipped and deleted by the next leader's record
        kt = bb.keys.history_term(999)
        bb.put_value(kt, forger.seal("term", kt, {"term": 99, "epoch": 999, "leader": "x",
                                                  "previous": "", "previous_epoch": 0,
                                                  "reason": "forged", "at": 0.0}))  # fmt: skip
        assert all(t.leader != "x" for t in history.terms(bb, signer))
        _, puts, deletes = history.takeover(bb, "b", 5000, signer=signer)
        assert kt in deletes
        ((key, value),) = puts.items()
        assert history.parse_term(value, signer, key) is not None
        # pauses: a forged one is no pause; a sealed one is
        rejected: list[str] = []
        bb.put_value(bb.keys.paused, forger.seal("paused", bb.keys.paused,
                                                 {"by": "x", "reason": "", "at": 1.0}))  # fmt: skip
        assert maintenance.read(bb, signer, lambda e: rejected.append(e.reason)) is None
        assert rejected and "bad MAC" in rejected[0]
        p = maintenance.pause(bb, "ced:alice@h1", "upgrade", signer)
        assert maintenance.read(bb, signer) == p
        b.stop(resign=True, timeout=3)
    finally:
        a.stop(resign=True, timeout=3)
        bb.close()
