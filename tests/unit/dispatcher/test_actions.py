"""Leader-only actions: one table, typed arguments, one result, local path without etcd."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from agent.common import certs
from dispatcher.config import DispatcherConfig
from dispatcher.core import Dispatcher
from dispatcher.ha import actions
from dispatcher.pairing import queue as pq
from dispatcher.registry import RegistryError


@pytest.fixture
def d(tmp_path: Path) -> Dispatcher:
    cfg = DispatcherConfig(
        path=str(tmp_path / "ctrl-exec.conf"), ca_dir=str(tmp_path / "etc"),
        state_dir=str(tmp_path / "state"), dispatcher_id="disp-a",
    ).finish()  # fmt: skip
    return Dispatcher(cfg)


def _queue(d: Dispatcher, host: str = "web1.example.net") -> str:
    csr = certs.make_csr(certs.new_key("ec-p256"), host)
    rec = pq.submit(d.cfg.pairing_dir, hostname=host, csr=csr, nonce="ab" * 16,
                    source_ip="192.0.2.9")  # fmt: skip
    return str(rec["id"])


def test_every_action_takes_the_dispatcher_and_keyword_arguments_only() -> None:
    for action in actions.ACTIONS.values():
        params = list(inspect.signature(action.fn).parameters.values())
        assert params[0].name == "d", action.name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), action.name
        assert actions.lookup(action.name) is action


@pytest.mark.parametrize(
    ("name", "args", "error"),
    [
        ("approve", {}, "missing argument reqid"),
        ("approve", {"reqid": 7}, "argument reqid has the wrong type"),
        ("approve", {"reqid": "a", "agent_port": "80"}, "argument agent_port has the wrong type"),
        ("approve", {"reqid": "a", "agent_port": True}, "argument agent_port has the wrong type"),
        ("approve", {"reqid": "a", "sudo": 1}, "unknown argument(s) sudo"),
        ("deny", {"reqid": ["a"]}, "argument reqid has the wrong type"),
        ("maintain", {"now": 1}, "unknown argument(s) now"),
    ],
)
def test_arguments_are_checked_before_anything_runs(
    d: Dispatcher, name: str, args: dict[str, Any], error: str
) -> None:
    with pytest.raises(actions.ActionFailed, match=error.replace("(", r"\(").replace(")", r"\)")):
        actions.perform(d, name, args)


def test_unknown_action_and_non_object_arguments_are_refused(d: Dispatcher) -> None:
    with pytest.raises(actions.ActionFailed, match="unknown action 'sign-anything'"):
        actions.request(d, "sign-anything")
    with pytest.raises(actions.ActionFailed, match="arguments must be an object"):
        actions.bind(actions.lookup("deny"), ["x"])  # type: ignore[arg-type]


def test_bootstrap_then_pairing_decisions_locally_without_etcd(d: Dispatcher) -> None:
    ca = actions.request(d, "setup-ca")
    assert ca.leader == "" and ca.epoch is None
    assert Path(ca.data["key"]).stat().st_mode & 0o777 == 0o600
    disp = actions.request(d, "setup-ctrl-exec")
    assert Path(disp.data["cert"]).exists() and disp.data["serial"]
    first, second = _queue(d), _queue(d, "web2.example.net")
    listed = actions.request(d, "list-requests").data
    assert {r["id"] for r in listed} == {first, second}
    assert all("csr" not in r and "nonce" not in r for r in listed)
    approved = actions.request(d, "approve", {"reqid": first, "lookup_by": "ip"}).data
    assert approved["hostname"] == "web1.example.net" and approved["addr"] == "192.0.2.9"
    assert d.registry.get("web1.example.net") is not None
    assert actions.request(d, "deny", {"reqid": second}).data == {"reqid": second}
    assert actions.request(d, "list-requests").data == []
    with pytest.raises(actions.ActionFailed) as info:
        actions.request(d, "approve", {"reqid": second})
    assert isinstance(info.value.__cause__, pq.PairingQueueError)


def test_edit_and_unpair_locally(d: Dispatcher) -> None:
    d.registry.register("web1", ip="192.0.2.1", expiry="2030-01-01")
    rec = actions.request(d, "edit-agent", {"name": "web1", "rename": "web9", "port": 8443}).data
    assert rec["hostname"] == "web9" and rec["port"] == 8443
    assert d.registry.get("web1") is None
    with pytest.raises(actions.ActionFailed, match="nothing to change"):
        actions.request(d, "edit-agent", {"name": "web9"})
    assert actions.request(d, "unpair", {"name": "web9"}).data == {
        "hostname": "web9", "expiry": "2030-01-01"}  # fmt: skip
    with pytest.raises(actions.ActionFailed) as info:
        actions.request(d, "unpair", {"name": "web9"})
    assert isinstance(info.value.__cause__, RegistryError)


def test_the_leaders_rebroadcast_gives_each_agent_a_short_deadline(
    d: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's request loop waits for a rebroadcast round: an agent that does not
    answer (powered off) must not hold it for ``read_timeout`` (60 s) every 10 s."""
    from dispatcher.pki import rotation

    seen: list[float | None] = []

    async def fake(d: Dispatcher, now: float | None = None,
                   timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
        seen.append(timeout)
        return {"serial": None, "updated": [], "failed": []}

    monkeypatch.setattr(rotation, "broadcast", fake)
    assert actions.perform(d, "broadcast").data["updated"] == []
    assert seen == [actions.REBROADCAST_TIMEOUT] and actions.REBROADCAST_TIMEOUT < 60
