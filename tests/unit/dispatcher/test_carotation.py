"""CA rotation logic without agent processes: the bundle rules of the agent
(:mod:`agent.cabundle`), the answer classification and state file of
:mod:`dispatcher.pki.carotation`, the ``rotate-ca`` action's arguments."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest

from agent import cabundle
from agent.common.certs import fingerprint
from dispatcher.client.wire import AgentReply
from dispatcher.ha import actions
from dispatcher.pki import ca as pki
from dispatcher.pki import carotation
from ops.lab.dispatcherenv import make_env
from ops.lab.pki import TestCA


def test_merge_adds_checked_cas_and_never_removes(tmp_path: Path) -> None:
    a, b = TestCA(tmp_path / "a"), TestCA(tmp_path / "b", cn="CA b")
    pem_b = b.cert_path.read_text()
    out = cabundle.merged([a.cert], pem_b)
    assert [fingerprint(c) for c in out] == [fingerprint(a.cert), fingerprint(b.cert)]
    assert cabundle.merged(out, pem_b) == out  # idempotent
    assert cabundle.merged(out, a.cert_path.read_text()) == out
    leaf = a.issue("leaf", cn="leaf")
    with pytest.raises(cabundle.BundleError, match="not a CA"):
        cabundle.merged([a.cert], leaf.cert.read_text())
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=4000)
    with pytest.raises(cabundle.BundleError, match="validity"):
        cabundle.merged([a.cert], pem_b, now=later)


def test_drop_keeps_the_caller_and_the_agent_working(tmp_path: Path) -> None:
    old, new = TestCA(tmp_path / "old"), TestCA(tmp_path / "new", cn="CA new")
    own_old = old.sign_public_key(old.key.public_key(), "agent")
    own_new = new.sign_public_key(new.key.public_key(), "agent")
    caller_old = old.sign_public_key(old.key.public_key(), "ctrl-exec-dispatcher")
    caller_new = new.sign_public_key(new.key.public_key(), "ctrl-exec-dispatcher")
    both = [old.cert, new.cert]
    fp_old = fingerprint(old.cert)
    with pytest.raises(cabundle.BundleError, match="agent's own"):
        cabundle.dropped(both, fp_old, own_old, caller_new)
    with pytest.raises(cabundle.BundleError, match="calling dispatcher"):
        cabundle.dropped(both, fp_old, own_new, caller_old)
    with pytest.raises(cabundle.BundleError, match="calling dispatcher"):
        cabundle.dropped(both, fp_old, own_new, None)
    assert cabundle.dropped(both, fp_old, own_new, caller_new) == [new.cert]
    assert cabundle.dropped([new.cert], fp_old, own_new, caller_new) == [new.cert]  # absent
    with pytest.raises(cabundle.BundleError, match="only CA"):
        cabundle.dropped([new.cert], fingerprint(new.cert), own_new, caller_new)


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        (AgentReply(200, {"status": "ok"}, 1), "ok"),
        (AgentReply(404, {"error": "not found"}, 1, error="HTTP 404"), "upstream"),
        (AgentReply(None, None, 0, error="connection refused"), "offline"),
        (AgentReply(200, {"status": "error", "error": "renew first"}, 1), "error"),
        (AgentReply(403, {"error": "serial mismatch"}, 1, error="HTTP 403"), "error"),
    ],
)
def test_answers_are_classified(reply: AgentReply, want: str) -> None:
    status, error = carotation._classify(reply)
    assert status == want
    assert (error == "") == (want == "ok")


def test_state_file_round_trip_and_refusals(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    d = env.d
    assert carotation.load(d) is None
    assert carotation.status(d) == {"phase": None}
    with pytest.raises(carotation.CARotationError, match="no CA rotation"):
        asyncio.run(carotation.advance(d))
    st = carotation.record(d, now=1_800_000_000.0)
    assert st.phase == "bundle" and st.old_fingerprint != st.new_fingerprint
    assert (Path(d.cfg.ca_dir) / "ca-next" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert Path(d.cfg.ca).read_text().count("BEGIN CERTIFICATE") == 2
    old_ca = pki.load_ca(d.cfg.ca_dir, d.cfg.ca).cert
    new_ca = pki.load_ca(Path(d.cfg.ca_dir) / "ca-next").cert
    assert new_ca.subject != old_ca.subject  # issuers are looked up by name in a bundle
    assert carotation.record(d) == st  # in progress: the same one, nothing new created
    again = carotation.load(d)
    assert again is not None and again.to_json() == st.to_json()
    carotation.state_path(d).write_text(json.dumps({"phase": "nonsense"}))
    with pytest.raises(carotation.CARotationError, match="malformed"):
        carotation.load(d)


def test_rotate_ca_action_arguments() -> None:
    action = actions.lookup("rotate-ca")
    assert action.phased
    assert actions.bind(action, {"mode": "status"}) == {"mode": "status"}
    with pytest.raises(actions.ActionFailed, match="wrong type"):
        actions.bind(action, {"mode": 3})
    with pytest.raises(actions.ActionFailed, match="unknown argument"):
        actions.bind(action, {"force": True})
