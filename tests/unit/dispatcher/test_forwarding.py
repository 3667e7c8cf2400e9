"""Forwarding assertions: the leader trusts who asked only through the cluster key."""

from __future__ import annotations

import base64
import json

import pytest

from cluster.signing import RecordSigner
from dispatcher.ha import forwarding as fw

KEY = b"\7" * 32
SIGNER = RecordSigner(KEY)
BODY = b'{"username":"alice"}'


def make(signer: RecordSigner = SIGNER, now: float = 1000.0, **kw: object) -> str:
    args: dict[str, object] = {"by": "inst-b", "who": {"cn": "alice-cert", "serial": "ab",
                                                       "issuer": "CN=ca"},
                               "username": "alice", "ip": "10.0.0.9", "method": "POST",
                               "path": "/pairing/approve/x", "body": BODY, "now": now}  # fmt: skip
    args.update(kw)
    return fw.make(signer, **args)  # type: ignore[arg-type]


def check(value: str, now: float = 1001.0, nonces: fw.Nonces | None = None,
          **kw: object) -> fw.Asserted:  # fmt: skip
    args: dict[str, object] = {"method": "POST", "path": "/pairing/approve/x", "body": BODY}
    args.update(kw)
    return fw.check(RecordSigner(KEY), value, nonces=nonces or fw.Nonces(), now=now,
                    **args)  # type: ignore[arg-type]  # fmt: skip


def test_a_valid_assertion_names_the_operator_and_carries_no_secret() -> None:
    value = make()
    who = check(value)
    assert (who.by, who.cn, who.username, who.ip) == ("inst-b", "alice-cert", "alice", "10.0.0.9")
    doc = json.loads(base64.urlsafe_b64decode(value.split(".")[0]))
    assert "token" not in json.dumps(doc) and doc["body_sha256"] == fw.body_hash(BODY)


@pytest.mark.parametrize(
    ("value_kw", "check_kw", "reason"),
    [
        ({"signer": RecordSigner(b"\1" * 32)}, {}, "not sealed"),
        ({}, {"now": 1000.0 + fw.VALID + 1}, "expired"),
        ({}, {"now": 1000.0 - fw.SKEW - 1}, "expired"),
        ({}, {"path": "/pairing/deny/x"}, "another request"),
        ({}, {"method": "GET"}, "another request"),
        ({}, {"body": b'{"username":"mallory"}'}, "another body"),
    ],
)
def test_refusals(value_kw: dict[str, object], check_kw: dict[str, object], reason: str) -> None:
    with pytest.raises(fw.AssertionRefused, match=reason):
        check(make(**value_kw), **check_kw)  # type: ignore[arg-type]


def test_tampered_or_garbage_assertions_are_refused() -> None:
    enc, mac = make().split(".")
    doc = json.loads(base64.urlsafe_b64decode(enc))
    doc["username"] = "root"
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode() + "." + mac
    for value in [forged, "", ".", "x.y", enc, "!!!." + mac, enc + "." + "0" * 64]:
        with pytest.raises(fw.AssertionRefused):
            check(value)


def test_a_replayed_assertion_is_refused() -> None:
    nonces = fw.Nonces(clock=lambda: 1001.0)
    value = make()
    check(value, nonces=nonces)
    with pytest.raises(fw.AssertionRefused, match="replayed"):
        check(value, nonces=nonces)
    check(make(), nonces=nonces)  # another assertion (another nonce) passes


def test_without_the_key_nothing_is_accepted_nor_made() -> None:
    with pytest.raises(fw.AssertionRefused, match="no cluster key"):
        fw.check(RecordSigner(None), make(), method="POST", path="/pairing/approve/x",
                 body=BODY, nonces=fw.Nonces(), now=1001.0)  # fmt: skip
    with pytest.raises(Exception, match="no cluster key"):
        make(signer=RecordSigner(None))


def test_the_reqid_is_sealed_with_the_assertion() -> None:
    """The follower's reqid travels in the assertion: the leader logs under it. Changed,
    the assertion is refused; :func:`claimed_reqid` (for the lines before the check) reads
    only a well-formed one."""
    value = make(reqid="00112233aabbccdd")
    assert check(value).reqid == "00112233aabbccdd"
    assert fw.claimed_reqid(value) == "00112233aabbccdd"
    assert check(make()).reqid == "" and fw.claimed_reqid(make()) == ""
    enc, mac = value.split(".")
    doc = json.loads(base64.urlsafe_b64decode(enc))
    doc["reqid"] = "ffffffffffffffff"
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode() + "." + mac
    with pytest.raises(fw.AssertionRefused, match="not sealed"):
        check(forged)
    for junk in ("", ".", "!!!.x", base64.urlsafe_b64encode(b'{"reqid":"a b"}').decode() + ".x"):
        assert fw.claimed_reqid(junk) == ""
