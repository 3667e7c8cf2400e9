"""Attacks on the job history by an etcd writer: a forged run is never listed or followed.

A real etcd on loopback; two dispatcher configs (instance A publishes a genuine run
through :class:`~dispatcher.history.shared.Publisher`, instance B reads). The attacker
writes straight into ``/<cluster>/jobs/`` without the cluster key: a summary sealed with
its own key naming a made-up owner, a plain JSON one, a genuine seal moved to another key,
a genuine seal with a field changed. B lists only the genuine run, ``show`` of a forged
reqid answers "no such run" without contacting any owner, and B's files are unchanged.
Each refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.backend import EtcdBackend
from cluster.signing import KEY_FILE, RecordSigner, write_key
from dispatcher.config import DispatcherConfig
from dispatcher.ha.records import Records
from dispatcher.history import owner
from dispatcher.history import records as hr
from dispatcher.history.shared import KIND, Publisher, prefix
from dispatcher.history.store import for_config
from dispatcher.history.view import listing, show
from ops.lab.etcd import ETCD, SKIP_REASON, EtcdCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
]

CLUSTER = "histattack"
FORGER = RecordSigner(b"\x66" * 32)  # the attacker's own key: not the cluster's


def attack(name: str, detail: str) -> None:
    print(f"[attack] {name}: refused ({detail})")


def snapshot(top: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(top.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(top)}\0{st.st_mode:o}\0{st.st_mtime_ns}\0".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


class Lab:
    def __init__(self, tmp: Path, etcd: EtcdCluster) -> None:
        self.ca = tmp / "ca"
        self.ca.mkdir()
        write_key(self.ca / KEY_FILE)
        self.etcd = etcd

        def conf(name: str) -> DispatcherConfig:
            return DispatcherConfig(
                ca_dir=str(self.ca), state_dir=str(tmp / f"state-{name}"),
                etcd_endpoints=etcd.endpoints, cluster_name=CLUSTER, instance_id=f"inst-{name}",
            ).finish()  # fmt: skip

        self.a, self.b = conf("a"), conf("b")
        self.backend = EtcdBackend(etcd.endpoints, cluster_name=CLUSTER, timeout=2.0)
        (tmp / "state-b").mkdir()

    def put(self, key: str, value: str) -> None:
        self.backend.put_value(f"{prefix(self.backend)}{key}", value)

    def listed(self) -> set[str]:
        return {s["reqid"] for s in listing(self.b, hr.Filter(), 1000).runs}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("histattack")
    etcd = EtcdCluster(tmp / "etcd").start()
    lab = Lab(tmp, etcd)
    try:
        rec = hr.build(reqid="genuine1", mode="sync", via="cli", script="uptime", args=[],
                       args_policy="keep", user=("alice", "unix"),
                       results=[{"host": "web1", "exit": 0, "stdout": "up\n"}],
                       outcomes={"web1": "ok"}, started=time.time() - 5, finished=time.time(),
                       instance="inst-a", output_max=1024)  # fmt: skip
        for_config(lab.a).save(rec)
        pub = Publisher(for_config(lab.a), lab.backend, Records.for_ca_dir(lab.ca, "inst-a"),
                        max_age=3600, max_runs=100)  # fmt: skip
        assert pub.step() == 1
        assert lab.listed() == {"genuine1"}
        yield lab
    finally:
        lab.backend.close()
        etcd.close()


def forged_summary(reqid: str, instance: str = "inst-evil", started: float | None = None) -> dict:
    t = time.time() if started is None else started
    return {"v": 1, "reqid": reqid, "mode": "sync", "via": "api", "script": "rm-rf",
            "user": "ceo", "user_source": "cert", "targets": ["web1"], "counts": {"ok": 1},
            "started": hr.iso(t), "finished": hr.iso(t + 1), "instance": instance}  # fmt: skip


def refused_everywhere(lab: Lab, reqid: str) -> None:
    """Not listed, not shown, and no owner was asked (``owner.fetch`` is never reached)."""
    before = snapshot(Path(lab.b.state_dir))
    assert reqid not in lab.listed()
    with pytest.raises(LookupError, match="no run"):
        show(lab.b, reqid)
    assert snapshot(Path(lab.b.state_dir)) == before


@pytest.fixture(autouse=True)
def no_owner_contact(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    asked: list[str] = []

    def fetch(*args: object, **kw: object) -> dict:
        asked.append(str(args))
        raise AssertionError("a forged record led to an owner")

    monkeypatch.setattr(owner, "fetch", fetch)
    yield asked
    assert asked == []


def test_forged_seal_naming_a_made_up_owner(lab: Lab) -> None:
    s = forged_summary("forged1")
    key = hr.key_of(s)
    lab.put(key, FORGER.seal(KIND, f"{prefix(lab.backend)}{key}", s))
    refused_everywhere(lab, "forged1")
    attack("history-forged-seal", "a summary sealed with another key is not listed or followed")


def test_unsealed_summary(lab: Lab) -> None:
    s = forged_summary("plain1")
    lab.put(hr.key_of(s), json.dumps(s))
    refused_everywhere(lab, "plain1")
    attack("history-unsealed", "a plain JSON summary is not listed")


def test_genuine_seal_moved_to_another_key(lab: Lab) -> None:
    genuine = lab.backend.get_prefix(prefix(lab.backend))
    src = next(kv for kv in genuine if kv.key.endswith("-genuine1"))
    moved = src.key.replace("-genuine1", "-replayed1")
    lab.backend.put_value(moved, src.value)
    refused_everywhere(lab, "replayed1")
    assert lab.listed() == {"genuine1"}  # the original is still listed, once
    attack("history-replayed-seal", "the seal binds the key: a copy under another key fails")


def test_genuine_seal_with_a_changed_field(lab: Lab) -> None:
    kv = next(k for k in lab.backend.get_prefix(prefix(lab.backend)) if k.key.endswith("-genuine1"))
    doc = json.loads(kv.value)
    body = doc["body"] if isinstance(doc, dict) and "body" in doc else None
    assert isinstance(body, dict), doc
    body["user"], body["instance"] = "someone-else", "inst-evil"
    evil_key = kv.key.replace("-genuine1", "-tampered1")
    body["reqid"] = "tampered1"
    lab.backend.put_value(evil_key, json.dumps(doc))
    refused_everywhere(lab, "tampered1")
    listed = {s["reqid"]: s for s in listing(lab.b, hr.Filter(), 100).runs}
    assert listed["genuine1"]["user"] == "alice" and listed["genuine1"]["instance"] == "inst-a"
    attack("history-tampered", "a changed field breaks the seal: not listed, not followed")


def test_a_flood_of_forged_summaries_lists_nothing(lab: Lab) -> None:
    t = time.time()
    for i in range(200):
        s = forged_summary(f"flood{i}", started=t + i)
        key = hr.key_of(s)
        lab.put(key, FORGER.seal(KIND, f"{prefix(lab.backend)}{key}", s))
    page = listing(lab.b, hr.Filter(), 10)
    assert [s["reqid"] for s in page.runs] == ["genuine1"]  # newest forged ones crowd nothing
    attack("history-flood", "200 forged summaries newer than every run: none listed")
