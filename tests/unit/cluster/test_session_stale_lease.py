"""A member record written under a lease the session has since replaced is not a conflict.

Seen on the multi-host lab (ops/runbooks/leader-partition.md): the leader's host is cut off
from etcd, its session lease expires; when the partition heals, the session thread grants a
new lease and registers the member key again, while another thread (the sync thread
recording the applied generation) is still writing the record under the old lease it read
before. That write finds the key bound to the new lease and used to be reported as
"instance_id already a live member" (held by this very process), which stops the daemon
with exit 78, so systemd does not restart it.
"""

from __future__ import annotations

from pathlib import Path

from cluster.backend import LocalBackend, MemberInfo
from cluster.errors import MemberConflict
from cluster.session import Session


def test_a_write_under_a_replaced_lease_is_not_a_conflict(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    conflicts: list[MemberConflict] = []
    me = MemberInfo("disp2", advertise_url="https://disp2.lab.test:7445", pid=4242)
    session = Session(backend, ttl=5, member=me, on_conflict=conflicts.append)
    try:
        session.join()
        old = session.current_lease_id()
        assert old is not None
        backend.resign(old)  # the lease expired while the host was cut off: the key went
        session._grant()  # the session thread's next round: a new lease, the key again
        new = session.current_lease_id()
        assert new is not None and new != old
        session._publish(old, me)  # the other thread's write, under the lease it read before
        assert conflicts == []
        assert session.conflict is None
        assert session.holds_member()
        assert [m.instance_id for m in backend.members()] == ["disp2"]
    finally:
        session.close()


def test_another_process_holding_the_key_is_still_a_conflict(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    other = Session(backend, ttl=5, member=MemberInfo("disp2", pid=1)).join()
    conflicts: list[MemberConflict] = []
    mine = Session(backend, ttl=5, member=MemberInfo("disp2", pid=2), on_conflict=conflicts.append)
    try:
        lease = mine._grant(claim=False)
        mine._publish(lease.id, MemberInfo("disp2", pid=2))
        assert len(conflicts) == 1 and conflicts[0].kind == "instance_id"
    finally:
        mine.close()
        other.close()
