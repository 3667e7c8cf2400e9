"""The pairing queue: file formats, stale expiry, approval precedence, denial."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.common import certs
from agent.common.serial import serial_to_hex
from dispatcher.config import DispatcherConfig
from dispatcher.pairing import queue as pq
from dispatcher.pki import ca as pki
from dispatcher.registry import Registry
from dispatcher.statewrite import LocalWriter

QUEUE_FIELDS = {"id", "hostname", "ip", "source_ip", "csr", "nonce", "lookup_by", "port",
                "received", "code", "reverse_dns", "reverse_confirmed",
                "csr_cn", "key_sha256"}  # fmt: skip


@pytest.fixture(scope="module")
def csr() -> str:
    return certs.make_csr(certs.new_key("ec-p256"), "web1.example.net")


@pytest.fixture
def cfg(tmp_path: Path) -> DispatcherConfig:
    c = DispatcherConfig(
        path=str(tmp_path / "ctrl-exec.conf"), ca_dir=str(tmp_path / "etc"),
        state_dir=str(tmp_path / "state"), dispatcher_id="disp-a",
    ).finish()  # fmt: skip
    ca = pki.create_ca(c.ca_dir)
    pki.issue_dispatcher_cert(ca, c.cert, c.key)
    return c


def _fresh(cn: str = "web1.example.net") -> str:
    """A CSR for a new key (the queue refuses a key it has seen)."""
    return certs.make_csr(certs.new_key("ec-p256"), cn)


def _submit(cfg: DispatcherConfig, csr: str, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"hostname": "web1.example.net", "csr": csr, "nonce": "ab" * 16,
                            "source_ip": "10.0.0.9", "max_per_source": 0}  # fmt: skip
    args.update(kw)
    return pq.submit(cfg.pairing_dir, **args)


def test_submit_writes_the_upstream_fields(cfg: DispatcherConfig, csr: str) -> None:
    rec = _submit(cfg, csr, ip="192.0.2.7", lookup_by="ip", port=8443, reverse_dns="w.example")
    assert pq.NEW_REQID_RE.match(rec["id"])
    path = Path(cfg.pairing_dir) / f"{rec['id']}.json"
    on_disk = json.loads(path.read_bytes())
    assert set(on_disk) == QUEUE_FIELDS
    assert on_disk == rec
    assert rec["code"] == certs.pairing_code(csr)
    assert rec["ip"] == "192.0.2.7" and rec["source_ip"] == "10.0.0.9"
    assert rec["lookup_by"] == "ip" and rec["port"] == 8443
    assert rec["reverse_confirmed"] == 0 and rec["reverse_dns"] == "w.example"
    assert rec["received"].endswith("Z") and "T" in rec["received"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not list(Path(cfg.pairing_dir).glob(".*.tmp"))


def test_submit_drops_invalid_hints(cfg: DispatcherConfig, csr: str) -> None:
    rec = _submit(cfg, csr, ip="not-an-ip", lookup_by="dns", port=70000)
    assert rec["ip"] == "10.0.0.9"
    assert rec["lookup_by"] is None and rec["port"] is None
    assert pq.valid_port("7443") == 7443 and pq.valid_port(True) is None
    assert pq.valid_port(0) is None and pq.valid_port(65535) == 65535


def test_submit_rejects_bad_hostname(cfg: DispatcherConfig, csr: str) -> None:
    with pytest.raises(pq.PairingQueueError, match="invalid hostname"):
        _submit(cfg, csr, hostname="-bad")
    with pytest.raises(pq.PairingQueueError, match="invalid hostname"):
        _submit(cfg, csr, hostname="a/../b")


def test_queue_cap(cfg: DispatcherConfig, csr: str) -> None:
    for _ in range(3):
        _submit(cfg, _fresh(), max_queue=3)
    with pytest.raises(pq.QueueFull, match=r"^pairing queue full$"):
        _submit(cfg, _fresh(), max_queue=3)
    assert pq.count(cfg.pairing_dir) == 3


def test_stale_requests_expire_unless_decided(cfg: DispatcherConfig, csr: str) -> None:
    old, decided, fresh = (_submit(cfg, _fresh())["id"] for _ in range(3))
    d = Path(cfg.pairing_dir)
    past = time.time() - 601
    for rid in (old, decided):
        os.utime(d / f"{rid}.json", (past, past))
    (d / f"{decided}.approved").write_text("{}")
    pending = pq.list_pending(cfg.pairing_dir)
    assert [r["id"] for r in pending] == [fresh]  # decided is not pending, old is gone
    assert not (d / f"{old}.json").exists()
    assert (d / f"{decided}.json").exists()
    # a full queue makes room by expiring stale requests first
    for _ in range(8):
        _submit(cfg, _fresh())
    assert pq.count(cfg.pairing_dir) == 10
    victim = pq.list_pending(cfg.pairing_dir)[0]["id"]
    os.utime(d / f"{victim}.json", (past, past))
    _submit(cfg, _fresh())
    assert not (d / f"{victim}.json").exists()


def test_approve_signs_registers_and_writes_approval(cfg: DispatcherConfig, csr: str) -> None:
    rec = _submit(cfg, csr, ip="192.0.2.7", port=8443)
    res = pq.approve(cfg, rec["id"])
    d = Path(cfg.pairing_dir)
    approval = json.loads((d / f"{rec['id']}.approved").read_bytes())
    assert set(approval) == {"status", "cert", "ca", "nonce", "dispatcher_serial",
                             "dispatcher_id"}  # fmt: skip
    assert approval["status"] == "approved"
    assert approval["nonce"] == "ab" * 16
    assert approval["dispatcher_id"] == "disp-a"
    disp_serial = x509.load_pem_x509_certificate(Path(cfg.cert).read_bytes()).serial_number
    assert approval["dispatcher_serial"] == format(disp_serial, "x")
    assert serial_to_hex(approval["dispatcher_serial"]) == approval["dispatcher_serial"]
    ca = x509.load_pem_x509_certificate(Path(cfg.ca).read_bytes())
    assert approval["ca"].encode() == Path(cfg.ca).read_bytes()
    cert = x509.load_pem_x509_certificate(approval["cert"].encode())
    cert.verify_directly_issued_by(ca)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 825
    assert cert.public_key() == x509.load_pem_x509_csr(csr.encode()).public_key()
    # the request stays until the listener delivers the approval
    assert (d / f"{rec['id']}.json").exists()
    reg = Registry(cfg.registry_dir).get("web1.example.net")
    assert reg is not None
    assert reg["ip"] == "192.0.2.7" and reg["port"] == 8443 and reg["lookup_by"] == "hostname"
    assert reg["reqid"] == rec["id"] and reg["expiry"] == pki.cert_not_after(approval["cert"])
    assert reg["dispatcher_serial"] == approval["dispatcher_serial"]
    assert reg["serial_status"] == "current"
    # pinned: the approved cert's serial and public key (what the client checks)
    assert reg["cert_serial"] == format(cert.serial_number, "x")
    assert reg["pubkey_sha256"] == pki.public_key_sha256(cert.public_key())
    assert reg["cert_serial_next"] == ""
    assert res.name == "web1.example.net" and res.expiry == reg["expiry"]
    assert res.addr == "web1.example.net" and res.warnings == []
    assert pq.outcome(cfg.pairing_dir, rec["id"]) == (
        "approved",
        (d / f"{rec['id']}.approved").read_bytes(),
    )


@pytest.mark.parametrize(
    ("hints", "flags", "want"),
    [
        ({}, {}, ("hostname", 7443, "10.0.0.9")),
        ({"lookup_by": "ip", "port": 9000, "ip": "192.0.2.1"}, {}, ("ip", 9000, "192.0.2.1")),
        (
            {"lookup_by": "ip", "port": 9000, "ip": "192.0.2.1"},
            {"lookup_by": "hostname", "agent_port": 7000, "ip": "198.51.100.3"},
            ("hostname", 7000, "198.51.100.3"),
        ),
    ],
)
def test_approve_precedence(
    cfg: DispatcherConfig,
    csr: str,
    hints: dict[str, Any],
    flags: dict[str, Any],
    want: tuple[str, int, str],
) -> None:
    rec = _submit(cfg, csr, **hints)
    res = pq.approve(cfg, rec["id"], **flags)
    assert (res.lookup_by, res.port, res.ip) == want
    reg = Registry(cfg.registry_dir).get("web1.example.net")
    assert reg is not None and (reg["lookup_by"], reg["port"], reg["ip"]) == want


def test_approve_errors(cfg: DispatcherConfig, csr: str) -> None:
    with pytest.raises(pq.NoSuchRequest, match=r"^No pending request '0123456789abcdef'$"):
        pq.approve(cfg, "0123456789abcdef")
    with pytest.raises(pq.PairingQueueError, match="invalid request id"):
        pq.approve(cfg, "../../etc/passwd")
    rid = _submit(cfg, csr)["id"]
    with pytest.raises(pq.PairingQueueError, match="lookup-by"):
        pq.approve(cfg, rid, lookup_by="dns")
    with pytest.raises(pq.PairingQueueError, match="agent-port"):
        pq.approve(cfg, rid, agent_port=0)
    with pytest.raises(pq.PairingQueueError, match="not an IP"):
        pq.approve(cfg, rid, ip="host.example")
    pq.approve(cfg, rid)
    with pytest.raises(pq.PairingQueueError, match="already been decided"):
        pq.approve(cfg, rid)
    with pytest.raises(pq.PairingQueueError, match="already been decided"):
        pq.deny(cfg, rid)


def test_approve_bad_csr_changes_nothing(cfg: DispatcherConfig) -> None:
    # submit() refuses such a CSR; a queue file written by another version may hold one
    rid = "0123456789abcdef"
    pq.paths(cfg.pairing_dir, rid)[0].parent.mkdir(parents=True, exist_ok=True)
    pq.paths(cfg.pairing_dir, rid)[0].write_text(json.dumps(
        {"id": rid, "hostname": "h1", "csr": "garbage", "nonce": "n", "ip": "10.0.0.1",
         "source_ip": "10.0.0.1"}))  # fmt: skip
    with pytest.raises(pq.PairingQueueError, match="cannot sign"):
        pq.approve(cfg, rid)
    assert pq.outcome(cfg.pairing_dir, rid) is None
    assert Registry(cfg.registry_dir).get("h1") is None
    assert pq.get_request(cfg.pairing_dir, rid) is not None


def test_approve_without_dispatcher_cert_warns(cfg: DispatcherConfig, csr: str) -> None:
    os.unlink(cfg.cert)
    res = pq.approve(cfg, _submit(cfg, csr)["id"])
    assert res.dispatcher_serial == ""
    assert any("EMPTY" in w for w in res.warnings)
    reg = Registry(cfg.registry_dir).get("web1.example.net")
    assert reg is not None and reg["serial_status"] == "unknown"


def test_deny(cfg: DispatcherConfig, csr: str) -> None:
    rid = _submit(cfg, csr)["id"]
    pq.deny(cfg, rid)
    d = Path(cfg.pairing_dir)
    assert not (d / f"{rid}.json").exists()
    raw = (d / f"{rid}.denied").read_bytes()
    assert json.loads(raw) == {"status": "denied", "reason": "rejected by operator"}
    assert pq.outcome(cfg.pairing_dir, rid) == ("denied", raw)
    with pytest.raises(pq.NoSuchRequest):
        pq.deny(cfg, "fedcba9876543210")


class RecordingWriter(LocalWriter):
    def __init__(self, fail: bool = False) -> None:
        self.writes: list[str] = []
        self.fail = fail

    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
        if self.fail:
            raise PermissionError("not the leader")
        self.writes.append(Path(path).name)
        super().write(path, data, mode)


def test_decisions_go_through_the_writer(cfg: DispatcherConfig, csr: str) -> None:
    rid = _submit(cfg, csr)["id"]
    fenced = RecordingWriter(fail=True)
    with pytest.raises(PermissionError):
        pq.approve(cfg, rid, writer=fenced)
    with pytest.raises(PermissionError):
        pq.deny(cfg, rid, writer=fenced)
    assert pq.outcome(cfg.pairing_dir, rid) is None
    assert Registry(cfg.registry_dir).get("web1.example.net") is None
    w = RecordingWriter()
    pq.approve(cfg, rid, writer=w)
    assert f"{rid}.approved" in w.writes and "web1.example.net.json" in w.writes


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("vm", True), ("web1.example.net", True), ("a-b.c-d", True), ("1host.example", True),
        ("x" * 63 + ".example", True), (".".join(["a" * 63] * 3) + "." + "b" * 61, True),
        ("x" * 64 + ".example", False), (".".join(["a" * 63] * 4), False),
        ("-bad", False), ("bad-", False), ("a..b", False), ("a.", False), (".a", False),
        ("under_score", False), ("a b", False), ("a\nb", False), ("", False),
        ("10.0.0.5", False), ("123", False), ("host.123", False), ("h\u00e9", False),
    ],
)  # fmt: skip
def test_agent_name_pattern(name: str, ok: bool) -> None:
    assert pq.valid_agent_name(name) is ok


def test_submit_refusals_write_nothing(cfg: DispatcherConfig) -> None:
    first = _submit(cfg, _fresh(), max_per_source=2)
    before = sorted(p.name for p in Path(cfg.pairing_dir).iterdir())
    cases: list[tuple[dict[str, Any], str]] = [
        ({"csr": _fresh("other.example")}, "csr-cn-mismatch"),
        ({"csr": "garbage"}, "invalid-csr"),
        ({"hostname": "bad_name", "csr": _fresh("bad_name")}, "invalid-hostname"),
        ({"csr": first["csr"], "nonce": "cd" * 16}, "duplicate-key"),
        ({"csr": first["csr"], "source_ip": "10.0.0.99"}, "duplicate-key"),
    ]
    for kw, why in cases:
        with pytest.raises(pq.Refused) as info:
            _submit(cfg, **{"max_per_source": 2, **kw})
        assert info.value.log_reason == why
    assert sorted(p.name for p in Path(cfg.pairing_dir).iterdir()) == before
    _submit(cfg, _fresh(), max_per_source=2)
    with pytest.raises(pq.Refused, match="too many pending requests from this address"):
        _submit(cfg, _fresh(), max_per_source=2)
    _submit(cfg, _fresh(), max_per_source=2, source_ip="10.0.0.10")  # another address is fine


def test_a_key_is_never_queued_twice(cfg: DispatcherConfig, csr: str) -> None:
    rid = _submit(cfg, csr)["id"]
    pq.deny(cfg, rid)
    with pytest.raises(pq.Refused, match="submitted before") as info:
        _submit(cfg, csr)
    assert info.value.log_reason == "reused-key"


def test_a_withdrawn_request_may_come_back_once(cfg: DispatcherConfig) -> None:
    """The agent's connection dropped before a decision (the request was withdrawn): the
    very same request (CSR, nonce, address) is queued again; no other use of the key is,
    and once it is queued again the way back is used up."""
    csr = _fresh()
    first = _submit(cfg, csr)
    assert pq.withdraw(cfg.pairing_dir, first["id"]) is False
    assert pq.get_request(cfg.pairing_dir, first["id"]) is None
    for kw in ({"nonce": "cd" * 16}, {"source_ip": "10.0.0.99"}):
        with pytest.raises(pq.Refused) as info:
            _submit(cfg, csr, **kw)
        assert info.value.log_reason == "reused-key"
    again = _submit(cfg, csr)
    assert again["id"] != first["id"] and "resumed" not in again
    assert [r["id"] for r in pq.list_pending(cfg.pairing_dir)] == [again["id"]]
    pq.deny(cfg, again["id"])
    with pytest.raises(pq.Refused) as info:  # denied: the key is done for
        _submit(cfg, csr)
    assert info.value.log_reason == "reused-key"


def test_a_decided_or_nonceless_withdrawal_gives_no_way_back(cfg: DispatcherConfig) -> None:
    csr = _fresh()
    rid = _submit(cfg, csr)["id"]
    pq.approve(cfg, rid)
    assert pq.withdraw(cfg.pairing_dir, rid) is True  # decided: nothing is remembered
    assert not (Path(cfg.pairing_dir) / pq.WITHDRAWN).exists()
    bare = _fresh()
    rid = _submit(cfg, bare, nonce="")["id"]  # an upstream agent sends no nonce
    assert pq.withdraw(cfg.pairing_dir, rid) is False
    with pytest.raises(pq.Refused, match="submitted before"):
        _submit(cfg, bare, nonce="")


def test_a_resubmission_is_the_same_request(cfg: DispatcherConfig) -> None:
    csr = _fresh()
    first = _submit(cfg, csr, max_per_source=1)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in Path(cfg.pairing_dir).iterdir())
    again = _submit(cfg, csr, max_per_source=1)  # at the cap: still the same request
    assert again == {**first, "resumed": "pending"}
    assert sorted((p.name, p.stat().st_mtime_ns)
                  for p in Path(cfg.pairing_dir).iterdir()) == before  # fmt: skip


def test_an_approval_outlives_the_queue_that_held_it(cfg: DispatcherConfig, tmp_path: Path
                                                     ) -> None:  # fmt: skip
    """A new leader (another pairing dir, the same replicated ca_dir) answers the agent's
    resubmission with the approval; another nonce for that key is refused."""
    csr = _fresh()
    rec = _submit(cfg, csr)
    res = pq.approve(cfg, rec["id"])
    kept = pq.approvals_dir(cfg)
    assert kept.parent == Path(cfg.ca_dir)
    new_queue = tmp_path / "new-leader-pairing"
    back = pq.submit(new_queue, hostname="web1.example.net", csr=csr, nonce="ab" * 16,
                     source_ip="10.0.0.77", approvals=kept)  # fmt: skip
    assert back["resumed"] == "approved" and back["id"] == rec["id"]
    assert back["approval"]["cert"] == res.cert and back["approval"]["nonce"] == "ab" * 16
    assert not new_queue.exists() or not list(new_queue.iterdir())  # nothing queued
    with pytest.raises(pq.Refused) as info:
        _submit(cfg, csr, approvals=kept, nonce="cd" * 16)
    assert info.value.log_reason == "reused-key"


def test_kept_approvals_are_pruned(cfg: DispatcherConfig) -> None:
    rec = _submit(cfg, _fresh())
    pq.approve(cfg, rec["id"])
    kept = list(pq.approvals_dir(cfg).glob("*.json"))
    assert len(kept) == 1
    old = time.time() - pq.APPROVED_KEEP - 10
    os.utime(kept[0], (old, old))
    pq.approve(cfg, _submit(cfg, _fresh("web2.example.net"), hostname="web2.example.net")["id"])
    left = list(pq.approvals_dir(cfg).glob("*.json"))
    assert len(left) == 1 and left[0] != kept[0]


def test_describe(cfg: DispatcherConfig) -> None:
    Registry(cfg.registry_dir).register("web1.example.net", ip="10.0.0.7")
    Registry(cfg.registry_dir).register("db1.example.net", ip="192.0.2.4")
    rec = _submit(cfg, _fresh(), ip="192.0.2.4")
    (got,) = pq.describe([rec], Registry(cfg.registry_dir))
    assert got["csr_cn"] == "web1.example.net" and got["approve_ip"] == "192.0.2.4"
    assert got["source_ip"] == "10.0.0.9"
    assert got["registered"] is True and got["registered_ip"] == "10.0.0.7"
    assert got["ip_registered_to"] == ["db1.example.net"]
