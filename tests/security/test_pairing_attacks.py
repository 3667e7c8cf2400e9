"""Attacks on pairing: each must fail for the attacker AND leave nothing changed.

The dispatcher side runs a real :class:`PairingServer` (as ``tests/integration/test_pairing``)
with one honest request pending from another address and one agent registered; the queue
and registry directories are hashed (names, modes, mtimes, contents) before and after each
refused attack. The agent side runs the real ``ctrl-exec-agent request-pairing`` CLI
against impostor listeners and forged approvals; its credential and state directories are
hashed the same way. Each refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from agent.common import certs
from agent.common.tlsconf import client_context
from agent.common.wire import dumps
from dispatcher.config import DispatcherConfig
from dispatcher.pairing import queue as pq
from dispatcher.pki import ca as pki
from dispatcher.registry import Registry
from ops.lab.pairing import frame, read_response
from ops.lab.proc import wait_until
from tests.integration.test_pairing import (
    Events,
    Listener,
    agent_files,
    request_pairing,
)

pytestmark = pytest.mark.integration

HONEST_SOURCE = "127.0.0.5"


# ----- helpers -------------------------------------------------------------------------------


def settled_snapshot(*dirs: str | Path, within: float = 5.0) -> str:
    """:func:`snapshot` once two taken 0.2 s apart agree (an earlier test's refusal or
    delivery may still be landing: the listener writes off its event loop)."""
    deadline = time.monotonic() + within
    last = snapshot(*dirs)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = snapshot(*dirs)
        if now == last:
            return now
        last = now
    raise AssertionError(f"{dirs} still changing after {within} s")


def snapshot(*dirs: str | Path) -> str:
    """One hash over every entry below ``dirs``: relative name, mode, mtime and content."""
    h = hashlib.sha256()
    for top in map(Path, dirs):
        h.update(f"\0{top}\0".encode())
        if not top.exists():
            h.update(b"absent")
            continue
        for p in sorted(top.rglob("*")):
            st = p.lstat()
            h.update(f"{p.relative_to(top)}\0{st.st_mode:o}\0{st.st_mtime_ns}\0".encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def attack(name: str, detail: str) -> None:
    print(f"[attack] {name}: refused ({detail})")


@pytest.fixture(autouse=True)
def _show_attacks(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """The ``[attack]`` lines reach the suite's output even when output is captured."""
    yield
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[attack]")]
    if lines:
        with capsys.disabled():
            print("", *lines, sep="\n")


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_for(key: CertificateIssuerPrivateKeyTypes, cn: str) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))  # fmt: skip
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def body_for(hostname: str, csr: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"hostname": hostname, "csr": csr or csr_for(new_key(), hostname),
            "nonce": "ab" * 16, **extra}  # fmt: skip


def open_pairing(port: int, body: dict[str, Any], source: str = "127.0.0.1"
                 ) -> tuple[ssl.SSLSocket, IO[bytes], dict[str, Any]]:  # fmt: skip
    """Send one request from ``source``: the socket, its stream and the first answer."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s = client_context(None).wrap_socket(raw)
    s.sendall(frame(dumps(body)))
    fh = s.makefile("rb")
    code, _, data = read_response(fh)
    assert code == 200
    answer = json.loads(data)
    assert isinstance(answer, dict)
    return s, fh, answer


def ask(port: int, body: dict[str, Any], source: str = "127.0.0.1") -> dict[str, Any]:
    s, fh, answer = open_pairing(port, body, source)
    fh.close()
    s.close()
    return answer


@dataclass
class Dispatcher:
    cfg: DispatcherConfig
    lst: Listener
    honest: dict[str, Any]
    held: list[tuple[ssl.SSLSocket, IO[bytes]]]

    @property
    def port(self) -> int:
        return self.lst.port

    def state(self) -> str:
        return snapshot(self.cfg.pairing_dir, self.cfg.registry_dir)

    def hold(self, body: dict[str, Any], source: str = "127.0.0.1") -> dict[str, Any]:
        s, fh, answer = open_pairing(self.port, body, source)
        self.held.append((s, fh))
        return answer

    def refused(self, name: str, body: dict[str, Any], reason: str,
                source: str = "127.0.0.1") -> dict[str, Any]:  # fmt: skip
        """Send ``body``; it must be refused with ``reason`` and change nothing."""
        before = self.state()
        answer = ask(self.port, body, source)
        assert answer["status"] == "error" and re.search(reason, answer["reason"]), answer
        assert self.state() == before, f"{name} changed the queue or the registry"
        attack(name, answer["reason"])
        return answer


@pytest.fixture
def dispatcher(cfg: DispatcherConfig, listen: Callable[..., Listener]) -> Iterator[Dispatcher]:
    """A listener with one honest request pending (held open) and one agent registered."""
    Registry(cfg.registry_dir).register("victim.example", ip="192.0.2.10")
    lst = listen(cfg)
    d = Dispatcher(cfg, lst, {}, [])
    honest_key = new_key()
    d.honest = {
        "key": honest_key,
        **body_for("honest.example", csr_for(honest_key, "honest.example")),
    }
    first = d.hold({k: v for k, v in d.honest.items() if k != "key"}, HONEST_SOURCE)
    assert first["status"] == "pending", first
    d.honest["reqid"] = first["reqid"]
    yield d
    for s, fh in d.held:
        fh.close()
        s.close()


# ----- the name and the CSR --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "hostname", "cn"),
    [
        ("underscore", "evil_host", "evil_host"),
        ("ipv4-literal-as-name", "192.0.2.10", "192.0.2.10"),
        ("trailing-dot", "victim.example.", "victim.example."),
        ("leading-hyphen", "-victim.example", "-victim.example"),
        ("empty-label", "victim..example", "victim..example"),
        ("newline-log-injection", "x\nACTION=pair-approve", "x"),
        ("path-traversal", "../agents/victim.example", "x"),
        ("over-253", ".".join(["a" * 63] * 4), "x"),
        ("label-over-63", "a" * 64 + ".example", "x"),
        ("not-a-string", ["victim.example"], "victim.example"),
    ],
)  # fmt: skip
def test_hostname_must_be_rfc1123(dispatcher: Dispatcher, events: Events, label: str,
                                  hostname: Any, cn: str) -> None:  # fmt: skip
    dispatcher.refused(f"hostname-{label}", body_for(hostname, csr_for(new_key(), cn)),
                       r"^invalid hostname$")  # fmt: skip
    wait_until(lambda: events.has("pair-reject", reason="invalid-hostname"), 5, "log")


def test_csr_cn_must_be_the_requested_name(dispatcher: Dispatcher, events: Events) -> None:
    """An agent asking for ``victim.example`` with a CSR made out to another name."""
    body = body_for("victim.example", csr_for(new_key(), "attacker.example"))
    dispatcher.refused("csr-cn-mismatch", body, r"^invalid CSR: its common name is not the "
                       r"requested hostname$")  # fmt: skip
    two_cns = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x.example"),
                                        x509.NameAttribute(NameOID.COMMON_NAME, "victim.example")]))
               .sign(new_key(), hashes.SHA256())
               .public_bytes(serialization.Encoding.PEM).decode())  # fmt: skip
    dispatcher.refused("csr-second-cn", body_for("victim.example", two_cns),
                       r"common name is not the requested hostname")  # fmt: skip
    wait_until(lambda: events.has("pair-reject", reason="csr-cn-mismatch"), 5, "log")


def test_unusable_csrs(dispatcher: Dispatcher) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    dispatcher.refused("csr-rsa-1024", body_for("weak.example", csr_for(weak, "weak.example")),
                       r"^invalid CSR: CSR key too small")  # fmt: skip
    dispatcher.refused("csr-garbage", body_for("junk.example", "-----BEGIN CERTIFICATE "
                       "REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
                       r"^invalid CSR: ")  # fmt: skip
    dispatcher.refused("csr-not-a-string", body_for("junk.example", {"pem": 1}),  # type: ignore[arg-type]
                       r"^invalid request$")  # fmt: skip


# ----- codes and keys --------------------------------------------------------------------------


def test_same_csr_twice_is_refused(dispatcher: Dispatcher, events: Events) -> None:
    """The code is SHA-256(CSR) (upstream agents compute it): the same CSR again would show
    the operator the same code for a second request. Only the agent's own resubmission
    (same CSR, same nonce, same address: it reconnects) is the same request."""
    replay = {k: v for k, v in dispatcher.honest.items() if k not in ("key", "reqid")}
    dispatcher.refused("replayed-csr-new-nonce", {**replay, "nonce": "cd" * 16},
                       r"^duplicate request: this key is already waiting")  # fmt: skip
    wait_until(lambda: events.has("pair-reject", reason="duplicate-key"), 5, "log")
    dispatcher.refused("replayed-csr-and-nonce-from-another-address", replay,
                       r"^duplicate request: this key is already waiting")  # fmt: skip


def test_resubmission_is_the_same_request(dispatcher: Dispatcher, events: Events) -> None:
    """The honest agent reconnecting (same CSR and nonce, same address) gets its request
    back, pending under the same reqid: no second request, and its first connection
    going away does not withdraw it."""
    replay = {k: v for k, v in dispatcher.honest.items() if k not in ("key", "reqid")}
    before = settled_snapshot(dispatcher.cfg.pairing_dir)
    s, fh, again = open_pairing(dispatcher.port, replay, HONEST_SOURCE)
    with s, fh:
        assert again == {"status": "pending", "reqid": dispatcher.honest["reqid"]}
        assert snapshot(dispatcher.cfg.pairing_dir) == before
        first_s, first_fh = dispatcher.held.pop(0)  # the first connection drops
        first_fh.close()
        first_s.close()
        wait_until(lambda: events.has("pair-reattach", reqid=dispatcher.honest["reqid"]), 5,
                   "the first connection's end seen")  # fmt: skip
        assert pq.get_request(dispatcher.cfg.pairing_dir, dispatcher.honest["reqid"])
        pq.approve(dispatcher.cfg, dispatcher.honest["reqid"])
        decision = json.loads(read_response(fh)[2])
    assert decision["status"] == "approved" and decision["nonce"] == replay["nonce"]
    # delivered: once more (the answer lost on the way) gets the kept approval again
    late = ask(dispatcher.port, replay, "127.0.0.7")
    assert late == {"status": "pending", "reqid": dispatcher.honest["reqid"]}
    # an approved key with another nonce is a replay, not the agent
    dispatcher.refused("approved-key-new-nonce", {**replay, "nonce": "ef" * 16},
                       r"^duplicate request: this key was submitted before")  # fmt: skip


def test_same_key_in_a_new_csr_is_refused(dispatcher: Dispatcher) -> None:
    """A new signature over the same key is a new PEM, so a new code: still refused."""
    again = csr_for(dispatcher.honest["key"], "honest.example")
    assert again != dispatcher.honest["csr"]
    dispatcher.refused("same-key-new-csr", body_for("honest.example", again),
                       r"^duplicate request: this key is already waiting")  # fmt: skip


def test_a_key_seen_before_is_refused_after_its_request_ended(dispatcher: Dispatcher) -> None:
    key = new_key()
    body = body_for("retry.example", csr_for(key, "retry.example"))
    s, fh, first = open_pairing(dispatcher.port, body)
    with s, fh:
        pq.deny(dispatcher.cfg, first["reqid"])
        assert json.loads(read_response(fh)[2])["status"] == "denied"
    wait_until(lambda: not list(Path(dispatcher.cfg.pairing_dir).glob(f"{first['reqid']}.*")),
               5, "the denial delivered")  # fmt: skip
    dispatcher.refused("resubmitted-denied-csr", body, r"^duplicate request: this key was "
                       r"submitted before")  # fmt: skip


def test_a_decision_made_between_the_listeners_two_looks_is_delivered(
    dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A denial written right after the listener looked for a decision (the decision is
    written before the request is deleted) still reaches the agent; the listener took the
    deleted request for one delivered on another connection and hung up (a full run)."""
    s, fh, first = open_pairing(dispatcher.port, body_for("race.example"))
    real = pq.outcome
    raced: list[str] = []

    def racing(pairing_dir: str | Path, reqid: str) -> tuple[str, bytes] | None:
        got = real(pairing_dir, reqid)
        if got is None and reqid == first["reqid"] and not raced:
            raced.append(reqid)
            pq.deny(dispatcher.cfg, reqid)  # the operator decides right after this look
        return got

    monkeypatch.setattr(pq, "outcome", racing)
    with s, fh:
        assert json.loads(read_response(fh)[2])["status"] == "denied"
    assert raced == [first["reqid"]]


def test_a_code_equal_to_a_pending_code_is_refused(
    dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pending requests never show the same code (a ground collision is simulated)."""
    pending = pq.get_request(dispatcher.cfg.pairing_dir, dispatcher.honest["reqid"])
    assert pending is not None
    monkeypatch.setattr(pq, "pairing_code", lambda csr: pending["code"])
    dispatcher.refused("code-collision", body_for("ground.example"),
                       r"^pairing code collides with a pending request")  # fmt: skip


# ----- floods ----------------------------------------------------------------------------------


def test_one_address_cannot_fill_the_queue(dispatcher: Dispatcher, events: Events) -> None:
    cap = dispatcher.cfg.pairing_max_per_source
    assert cap == 3  # the default
    for n in range(cap):
        assert dispatcher.hold(body_for(f"flood{n}.example"))["status"] == "pending"
    dispatcher.refused("per-source-flood", body_for("flood9.example"),
                       r"^too many pending requests from this address$")  # fmt: skip
    wait_until(lambda: events.has("pair-reject", reason="source-limit", ip="127.0.0.1"), 5, "log")
    # another host still gets in (the queue holds 10)
    assert dispatcher.hold(body_for("other.example"), "127.0.0.6")["status"] == "pending"


def test_rate_limit_is_per_client_behind_a_load_balancer(
    tmp_path: Path, listen: Callable[..., Listener], events: Events
) -> None:
    """Two clients reach the listener through one balancer address (127.0.0.1): the one
    that floods is blocked, the other is not, and the queue records the real client."""
    c = DispatcherConfig(ca_dir=str(tmp_path / "etc"), state_dir=str(tmp_path / "state"),
                         pairing_rate_limit_volume="2/60/300").finish()  # fmt: skip
    pki.issue_dispatcher_cert(pki.create_ca(c.ca_dir), c.cert, c.key)
    lst = listen(c)

    fronts: list[asyncio.Server] = []

    async def front(client: str) -> int:  # what a PROXY-protocol front end will do
        srv = await asyncio.start_server(
            lambda r, w: lst.server.handle(r, w, client_ip=client), "127.0.0.1", 0
        )
        fronts.append(srv)
        return int(srv.sockets[0].getsockname()[1])

    async def close_fronts() -> None:
        for srv in fronts:
            srv.close()

    flooder, other = (lst.call(front(ip)) for ip in ("198.51.100.7", "198.51.100.8"))
    bad = {"hostname": "x"}  # answered (invalid request), counted by the limiter
    for _ in range(2):
        assert ask(flooder, bad)["status"] == "error"
    before = snapshot(c.pairing_dir, c.registry_dir)
    with pytest.raises((ssl.SSLError, OSError, AssertionError)):
        ask(flooder, body_for("flooder.example"))
    assert snapshot(c.pairing_dir, c.registry_dir) == before
    assert events.has("rate-block", ip="198.51.100.7", reason="volume")
    attack("rate-flood-behind-balancer", "198.51.100.7 blocked, connection closed unanswered")
    s, fh, first = open_pairing(other, body_for("other.example"))
    with s, fh:
        assert first["status"] == "pending", first
        rec = pq.get_request(c.pairing_dir, first["reqid"])
        assert rec is not None and rec["source_ip"] == "198.51.100.8"
    lst.call(close_fronts())


# ----- the agent side: an impostor dispatcher ------------------------------------------------


def dispatcher_cfg(root: Path, leaf_only: bool = False) -> DispatcherConfig:
    c = DispatcherConfig(ca_dir=str(root / "etc"), state_dir=str(root / "state"),
                         dispatcher_id="disp-test", pairing_rate_limit_disable=True).finish()  # fmt: skip
    pki.issue_dispatcher_cert(pki.create_ca(c.ca_dir), c.cert, c.key)
    if leaf_only:  # the listener then sends its certificate alone, as upstream's does
        c.ca = str(root / "etc" / "not-sent.crt")
    return c


def failure(err: str) -> str:
    """The agent's ``Pairing failed: ...`` text (its log thread may share the line)."""
    found = re.search(r"Pairing failed: (.*?)(?:ctrl-exec-agent\[|$)", err, re.MULTILINE)
    assert found is not None, err
    return found.group(1).strip()


def agent_dirs(tmp: Path) -> Any:
    a = agent_files(tmp / "agent")
    (a.root / "etc").mkdir(exist_ok=True)
    (a.root / "state").mkdir(exist_ok=True)
    return a


def agent_state(a: Any) -> str:
    return snapshot(a.root / "etc", a.root / "state")


def run_agent(a: Any, port: int, *extra: str) -> tuple[int, str, str]:
    proc = request_pairing(a, port, False, 30, *extra)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.decode(), (a.root / "pair.log").read_text()


@pytest.mark.parametrize("leaf_only", [False, True], ids=["other-ca", "leaf-only"])
def test_pinned_agent_refuses_an_impostor_before_sending(
    tmp_path: Path, cfg: DispatcherConfig, listen: Callable[..., Listener], leaf_only: bool
) -> None:
    impostor = dispatcher_cfg(tmp_path / "impostor", leaf_only=leaf_only)
    lst = listen(impostor)
    a = agent_dirs(tmp_path)
    mine, before = agent_state(a), snapshot(impostor.pairing_dir, impostor.registry_dir)
    pin = certs.ca_fingerprint(cfg.ca)  # the real dispatcher's CA
    rc, out, err = run_agent(
        a, lst.port, "--ca-fingerprint", pin.upper().replace("SHA256:", "sha256:")
    )
    assert rc == 3, (out, err)
    assert "nothing was sent" in err
    assert ("without its CA" if leaf_only else "does not match --ca-fingerprint") in err
    assert pq.count(impostor.pairing_dir) == 0 and lst.requests == []  # it never saw a CSR
    assert snapshot(impostor.pairing_dir, impostor.registry_dir) == before
    assert agent_state(a) == mine
    attack(f"impostor-dispatcher-{'leaf-only' if leaf_only else 'other-ca'}", failure(err))


def _forge_approval(c: DispatcherConfig, rec: dict[str, Any], ca_key: Any, ca_cert: Any,
                    public_key: Any) -> None:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rec["hostname"])]))
            .issuer_name(ca_cert.subject).public_key(public_key).serial_number(4242)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    pem = lambda x: x.public_bytes(serialization.Encoding.PEM).decode()  # noqa: E731
    approval = {"status": "approved", "cert": pem(cert), "ca": pem(ca_cert),
                "nonce": rec["nonce"], "dispatcher_serial": "abc1", "dispatcher_id": "evil"}  # fmt: skip
    pq.paths(c.pairing_dir, rec["id"])[1].write_text(json.dumps(approval))


@pytest.mark.parametrize("forgery", ["foreign-ca", "cert-for-another-key"])
def test_agent_refuses_a_forged_approval(
    tmp_path: Path, cfg: DispatcherConfig, listen: Callable[..., Listener], forgery: str
) -> None:
    """The listener's chain is the pinned CA, but the approval it delivers is not sound."""
    lst = listen(cfg)
    a = agent_dirs(tmp_path)
    mine = agent_state(a)
    extra = ("--ca-fingerprint", certs.ca_fingerprint(cfg.ca)) if forgery == "foreign-ca" else ()
    proc = request_pairing(a, lst.port, False, 30, *extra)
    try:
        wait_until(lambda: bool(pq.list_pending(cfg.pairing_dir)), 20, "the request")
        (rec,) = pq.list_pending(cfg.pairing_dir)
        csr_key = x509.load_pem_x509_csr(rec["csr"].encode()).public_key()
        if forgery == "foreign-ca":
            other = pki.create_ca(tmp_path / "other-ca")
            _forge_approval(cfg, rec, other.key, other.cert, csr_key)
        else:
            real = pki.load_ca(cfg.ca_dir)
            _forge_approval(cfg, rec, real.key, real.cert, new_key().public_key())
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (a.root / "pair.log").read_text()
    assert proc.returncode == 3, (out, err)
    want = (
        "does not match --ca-fingerprint" if forgery == "foreign-ca" else "not for this agent's key"
    )
    assert want in err, err
    assert agent_state(a) == mine  # no key, cert, CA or trust map stored
    attack(f"forged-approval-{forgery}", failure(err))


# ----- controls: honest pairings still work --------------------------------------------------


@pytest.mark.parametrize("pinned", [True, False])
def test_honest_pairing_prints_or_checks_the_ca_fingerprint(
    tmp_path: Path, cfg: DispatcherConfig, listen: Callable[..., Listener], pinned: bool
) -> None:
    lst = listen(cfg)
    a = agent_dirs(tmp_path)
    fp = pki.ca_fingerprint(cfg.ca)
    assert re.fullmatch(r"SHA256:[0-9a-f]{64}", fp)
    assert fp == "SHA256:" + hashlib.sha256(
        x509.load_pem_x509_certificate(Path(cfg.ca).read_bytes()).public_bytes(
            serialization.Encoding.DER)).hexdigest()  # fmt: skip
    extra = ("--ca-fingerprint", ":".join(re.findall("..", fp[7:]))) if pinned else ()
    proc = request_pairing(a, lst.port, False, 30, *extra)
    try:
        wait_until(lambda: bool(pq.list_pending(cfg.pairing_dir)), 20, "the request")
        (rec,) = pq.list_pending(cfg.pairing_dir)
        (shown,) = pq.describe([rec], Registry(cfg.registry_dir))
        assert shown["csr_cn"] == "agent1.test" and shown["registered"] is False
        assert shown["approve_ip"] == shown["source_ip"] == "127.0.0.1"
        pq.approve(cfg, rec["id"])
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, (a.root / "pair.log").read_text())
    text = out.decode()
    assert f"Dispatcher CA: {fp}" in text
    assert ("matches --ca-fingerprint" in text) is pinned
    assert a.cert.exists() and a.ca.read_bytes() == Path(cfg.ca).read_bytes()


def test_bad_fingerprint_argument(tmp_path: Path) -> None:
    a = agent_dirs(tmp_path)
    rc, _, err = run_agent(a, 9, "--ca-fingerprint", "SHA256:abcd")
    assert rc == 2 and "not a SHA-256 fingerprint" in err


def test_a_withdrawn_request_comes_back_only_as_itself(dispatcher: Dispatcher) -> None:
    """An agent whose connection dropped before a decision may send its very request
    again (its request was withdrawn, nobody decided): from its own address, with its
    own nonce. Anyone replaying the CSR from another address, or with another nonce, is
    refused and changes nothing."""
    source = "127.0.0.8"
    body = body_for("dropped.example", csr_for(new_key(), "dropped.example"))
    s, fh, first = open_pairing(dispatcher.port, body, source)
    fh.close()
    s.close()
    wait_until(lambda: pq.get_request(dispatcher.cfg.pairing_dir, first["reqid"]) is None, 5,
               "the request withdrawn")  # fmt: skip
    dispatcher.refused("withdrawn-request-from-another-address", body,
                       r"^duplicate request: this key was submitted before", "127.0.0.9")  # fmt: skip
    dispatcher.refused("withdrawn-request-new-nonce", {**body, "nonce": "cd" * 16},
                       r"^duplicate request: this key was submitted before", source)  # fmt: skip
    s, fh, back = open_pairing(dispatcher.port, body, source)
    with s, fh:
        assert back["status"] == "pending" and back["reqid"] != first["reqid"], back
        pq.deny(dispatcher.cfg, back["reqid"])
        assert json.loads(read_response(fh)[2])["status"] == "denied"
    wait_until(lambda: not list(Path(dispatcher.cfg.pairing_dir).glob(f"{back['reqid']}.*")),
               5, "the denial delivered")  # fmt: skip
    dispatcher.refused("denied-request-once-withdrawn", body,
                       r"^duplicate request: this key was submitted before", source)  # fmt: skip
