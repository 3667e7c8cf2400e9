"""The roster keeps every configured instance for the load balancer's configuration: live
members plus sealed entries of those that are down; a forged entry adds no backend."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.backend import LocalBackend, MemberInfo
from cluster.signing import RecordSigner
from dispatcher.ha import roster
from dispatcher.ha.records import Records


def member(name: str, port: int) -> MemberInfo:
    return MemberInfo(instance_id=name, advertise_url=f"https://{name}.example.org:{port}",
                      health_port=7446, pairing_port=7444, proxy_port=7447)  # fmt: skip


def test_a_down_instance_stays_in_the_configuration(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "s")
    records = Records(RecordSigner(b"k" * 32))
    lease = b.lease_grant(5)
    live, down = member("disp1", 7445), member("disp2", 7445)
    assert b.claim_member(lease.id, live).held
    assert roster.record(b, records, live) and roster.record(b, records, down)
    assert not roster.record(b, records, down)  # unchanged: not rewritten
    got = roster.configured(b, records)
    assert [m.instance_id for m in got] == ["disp1", "disp2"]
    assert got[1].advertise_url == "https://disp2.example.org:7445" and got[1].proxy_port == 7447
    assert roster.forget(b, "disp2") and not roster.forget(b, "disp2")
    assert [m.instance_id for m in roster.configured(b, records)] == ["disp1"]
    b.close()


def test_a_forged_entry_adds_no_backend(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "s")
    records = Records(RecordSigner(b"k" * 32))
    forger = Records(RecordSigner(b"f" * 32))
    roster.record(b, records, member("disp1", 7445))
    evil = member("evil", 443)
    key = roster.key(b, "evil")
    b.put_value(key, forger.seal(roster.KIND, key, roster.Entry.of(evil).__dict__))
    b.put_value(roster.key(b, "plain"), json.dumps(roster.Entry.of(member("plain", 1)).__dict__))
    # a genuine entry copied under another name does not verify either (the key is bound)
    genuine = b.get_value(roster.key(b, "disp1"))
    assert genuine is not None
    b.put_value(roster.key(b, "copy"), genuine)
    assert [e.instance_id for e in roster.read(b, records)] == ["disp1"]
    assert records.rejections.counts()[roster.KIND] == 3
    b.close()
