"""sync_ack: when a leader-only change counts as acknowledged."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cluster.backend import MemberInfo
from dispatcher.config import DispatcherConfig
from dispatcher.ha.manifest import Layout
from dispatcher.ha.replication import NotAcknowledged, Replication, needed


class Published:
    def __init__(self, generation: int = 0) -> None:
        self.generation = generation
        self.kicked = 0

    def publish_soon(self) -> None:
        self.kicked += 1

    def ticket(self) -> int:
        return 0  # every write is carried by whatever generation is published

    def covered(self) -> tuple[int, int]:
        return 0, self.generation

    def covered_in(self, epoch: int) -> tuple[int, int] | None:
        return self.covered()


def members(*gens: int) -> list[MemberInfo]:
    return [MemberInfo(instance_id=f"m{i}", generation=g) for i, g in enumerate(gens)]


@pytest.mark.parametrize(
    ("mode", "n", "want"),
    [("majority", 1, 1), ("majority", 2, 2), ("majority", 3, 2), ("majority", 4, 3),
     ("majority", 5, 3), ("one", 1, 1), ("one", 3, 2), ("none", 5, 1)],
)  # fmt: skip
def test_needed(mode: str, n: int, want: int) -> None:
    assert needed(mode, n) == want


def test_majority_waits_for_the_published_generation_and_enough_members() -> None:
    pub, state = Published(4), {"members": members(4, 4, 4)}
    rep = Replication("m0", pub, lambda: state["members"], timeout=5)

    def progress() -> None:
        pub.generation = 5  # the publisher ran
        state["members"] = members(5, 4, 4)
        threading.Event().wait(0.1)
        state["members"] = members(5, 5, 4)  # one follower applied it

    t = threading.Thread(target=progress)
    t.start()
    assert rep.acknowledge(4) == 5
    t.join()
    assert pub.kicked == 1  # the publisher was asked to skip its debounce


def test_not_acknowledged_says_how_far_it_got() -> None:
    rep = Replication("m0", Published(7), lambda: members(7, 6, 6), timeout=0.2)
    with pytest.raises(NotAcknowledged, match=r"applied by 1 of 3 members \(m0\), 2 needed"):
        rep.acknowledge(6)
    with pytest.raises(NotAcknowledged, match="no generation carrying it was published"):
        Replication("m0", Published(7), lambda: members(7), timeout=0.1).acknowledge(7)


def test_one_and_none() -> None:
    assert Replication("m0", Published(3), lambda: members(3, 2, 3), mode="one",
                       timeout=0.2).acknowledge(2) == 3  # fmt: skip
    assert Replication("m0", Published(3), lambda: members(3, 2, 2), mode="none",
                       timeout=0.2).acknowledge(2) == 3  # fmt: skip
    with pytest.raises(NotAcknowledged):
        Replication("m0", Published(3), lambda: members(3, 2, 2), mode="one",
                    timeout=0.1).acknowledge(2)  # fmt: skip


def test_only_writes_to_files_a_generation_carries_count_as_changes(tmp_path: Path) -> None:
    cfg = DispatcherConfig(path=str(tmp_path / "etc" / "ctrl-exec.conf"),
                           ca_dir=str(tmp_path / "etc"), state_dir=str(tmp_path / "state")).finish()  # fmt: skip
    layout = Layout(cfg)
    rep = Replication("m0", Published(1), lambda: members(1), covers=layout.covers)
    for path, counted in [
        (tmp_path / "etc" / "ca.key", True),
        (Path(cfg.registry_dir) / "web1.json", True),
        (Path(cfg.rotation_file), True),
        (Path(cfg.pairing_dir) / "0123.approved", False),  # the leader's own queue
        (tmp_path / "etc" / "ctrl-exec.conf", False),  # each instance's own config
        (tmp_path / "etc" / ".stage" / "x", False),
        (tmp_path / "elsewhere", False),
    ]:
        before = rep.changes
        rep.note(path)
        assert (rep.changes == before + 1) is counted, path


def test_members_are_read_often_while_an_answer_is_due_then_less(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Right after the publish the records are read every POLL_FAST s (a follower applies
    within tens of ms: it is noticed about 1 ms later, not up to POLL later); after FAST_FOR
    every POLL s."""
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    monkeypatch.setattr("dispatcher.ha.replication.time.sleep", sleep)
    rep = Replication("m0", Published(3), lambda: members(3, 2, 2), timeout=1.0,
                      clock=lambda: now[0])  # fmt: skip
    with pytest.raises(NotAcknowledged):
        rep.acknowledge(2)
    fast = [s for s in sleeps if s == Replication.POLL_FAST]
    assert Replication.POLL_FAST < Replication.POLL
    assert sleeps[: len(fast)] == fast  # the fast reads come first
    assert len(fast) == pytest.approx(Replication.FAST_FOR / Replication.POLL_FAST, abs=2)
    assert set(sleeps[len(fast) :]) == {Replication.POLL}


def test_a_members_answer_to_the_push_counts_at_once() -> None:
    """A follower that answered the leader's push of the generation has applied it (and
    its member record says so): counted without waiting for the next read of the records;
    an answer from an instance that is no live member counts for nothing."""
    reads: list[int] = []
    news = threading.Condition()
    confirmed: dict[str, int] = {"gone": 9}

    def wait(timeout: float) -> bool:
        with news:
            return news.wait(timeout)

    def records() -> list[MemberInfo]:
        reads.append(1)
        return members(5, 4, 4)

    rep = Replication("m0", Published(5), records, timeout=5, confirmed=lambda: dict(confirmed),
                      wait_confirmed=wait)  # fmt: skip

    def answer() -> None:
        threading.Event().wait(0.2)
        with news:
            confirmed["m2"] = 5
            news.notify_all()

    t = threading.Thread(target=answer)
    t.start()
    assert rep.acknowledge(4) == 5
    t.join()
    assert reads  # the records were read, and m2 counted from its answer alone
    with pytest.raises(NotAcknowledged, match=r"applied by 1 of 3"):
        Replication("m0", Published(5), lambda: members(5, 4, 4), timeout=0.2,
                    confirmed=lambda: {"gone": 9, "m1": 4}, wait_confirmed=wait).acknowledge(4)  # fmt: skip
