"""Attacks on ``POST /ca-bundle`` (CA rotation) against a real agent process.

Every refused change must leave the agent's CA file byte for byte as it was and the agent
serving as before. Each refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from agent.common.certs import fingerprint
from ops.lab.agentproc import AgentProc, make_agent
from ops.lab.pki import Issued, TestCA

pytestmark = pytest.mark.integration


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.old = TestCA(tmp / "old-ca")
        self.new = TestCA(tmp / "new-ca", cn="ctrl-exec CA 2")
        self.evil = TestCA(tmp / "evil-ca", cn="ctrl-exec CA")  # same name, other key
        self.disp = self.old.issue("disp", cn="ctrl-exec-dispatcher")
        self.intruder = self.old.issue("intruder", cn="ctrl-exec-dispatcher")  # not trusted
        self.agent = make_agent(tmp / "agent", self.old, {"disp": self.disp}, {})
        self.agent.start()

    def ca_bytes(self) -> bytes:
        return Path(self.agent_conf("ca")).read_bytes()

    def agent_conf(self, key: str) -> str:
        for line in self.agent.config.read_text().splitlines():
            k, _, v = line.partition("=")
            if k.strip() == key:
                return v.strip()
        raise KeyError(key)

    def post(self, body: dict[str, Any], who: Issued) -> tuple[int, dict[str, Any]]:
        resp = self.agent.call("POST", "/ca-bundle", body, who, timeout=10)
        obj = resp.json()
        assert isinstance(obj, dict)
        return resp.code, obj


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.agent.stop()


def pem(ca: TestCA) -> str:
    return ca.cert.public_bytes(serialization.Encoding.PEM).decode()


def attack(name: str, detail: str) -> None:
    print(f"[attack] {name}: refused ({detail})")


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def still_serving(agent: AgentProc, who: Issued) -> None:
    assert agent.call("POST", "/ping", {}, who, timeout=10).code == 200


def test_ca_bundle_attacks_change_nothing(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    before = lab.ca_bytes()
    leaf = lab.old.issue("leaf", cn="not-a-ca")

    code, body = lab.post({"action": "add", "bundle": pem(lab.evil)}, lab.intruder)
    assert code == 403 and body["error"] == "serial mismatch"
    attack("bundle from an untrusted dispatcher serial", f"{code} {body['error']}")

    refusals = {
        "leaf certificate as a CA": {"action": "add", "bundle": leaf.cert.read_text()},
        "garbage bundle": {"action": "add", "bundle": "-----BEGIN CERTIFICATE-----\nAAAA\n"},
        "empty bundle": {"action": "add", "bundle": ""},
        "oversized bundle": {"action": "add", "bundle": pem(lab.new) * 40},
        "too many CAs": {"action": "add", "bundle": "".join(
            pem(TestCA(lab.agent.root / f"many-{i}")) for i in range(4))},
        "drop the only CA": {"action": "drop", "fingerprint": fingerprint(lab.old.cert)},
        "drop with a bad fingerprint": {"action": "drop", "fingerprint": "SHA256:zz"},
        "unknown action": {"action": "replace", "bundle": pem(lab.evil)},
    }  # fmt: skip
    for name, req in refusals.items():
        code, body = lab.post(req, lab.disp)
        assert code == 200 and body["status"] == "error", (name, body)
        assert digest(lab.ca_bytes()) == digest(before), name
        attack(name, body["error"])

    # with a second CA trusted, dropping the one that issued the caller's (and the
    # agent's own) certificate is still refused
    code, body = lab.post({"action": "add", "bundle": pem(lab.new)}, lab.disp)
    assert code == 200 and body["status"] == "ok" and body["changed"] is True
    with_new = lab.ca_bytes()
    code, body = lab.post({"action": "drop", "fingerprint": fingerprint(lab.old.cert)}, lab.disp)
    assert code == 200 and body["status"] == "error"
    assert "agent's own certificate" in body["error"] or "calling dispatcher" in body["error"]
    assert lab.ca_bytes() == with_new
    attack("drop the CA of the agent's own and the caller's certificate", body["error"])
    still_serving(lab.agent, lab.disp)
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + "\n".join(ln for ln in out.splitlines() if ln.startswith("[attack]")))
