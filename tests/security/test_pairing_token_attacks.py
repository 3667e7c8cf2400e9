"""Attacks with pairing tokens: each must approve nothing, register nothing, and leave the
token store as it was (a refused token leaves the request pending for an operator, by
design: that is the only change).

A real :class:`PairingServer` on loopback (the fixtures of ``tests/integration/test_pairing``)
and raw pairing clients that send what an attacker can put in the request body. Each
refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.config import DispatcherConfig
from dispatcher.pairing import tokengate
from dispatcher.pairing import tokens as tk
from dispatcher.registry import Registry
from ops.lab.pairing import read_response
from ops.lab.proc import wait_until
from tests.integration.test_pairing import Events, Listener
from tests.security.test_pairing_attacks import ask, attack, body_for, open_pairing, snapshot

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _show_attacks(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[attack]")]
    if lines:
        with capsys.disabled():
            print("", *lines, sep="\n")


def make(cfg: DispatcherConfig, n: int = 1, expires_in: int = 3600, now: float | None = None,
         **kw: Any) -> list[str]:  # fmt: skip
    made = [tk.new_token() for _ in range(n)]
    tk.add(cfg.ca_dir, {i: tk.token_hash(t) for i, t in made}, expires_in=expires_in,
           now=now, **kw)  # fmt: skip
    return [t for _, t in made]


class Site:
    def __init__(self, cfg: DispatcherConfig, lst: Listener, events: Events) -> None:
        self.cfg, self.lst, self.events = cfg, lst, events

    def guarded(self) -> str:
        """The registry and the token store (the queue may gain a pending request)."""
        return snapshot(self.cfg.registry_dir, tk.store_path(self.cfg.ca_dir))

    def pair(self, hostname: str, token: object, source: str = "127.0.0.1") -> dict[str, Any]:
        """One request with ``token``; the second answer when one comes within 1.5 s."""
        s, fh, first = open_pairing(self.lst.port, body_for(hostname, pairing_token=token),
                                    source)  # fmt: skip
        with s, fh:
            if first.get("status") != "pending":
                return first
            s.settimeout(1.5)
            try:
                return {**json.loads(read_response(fh)[2]), "reqid": first["reqid"]}
            except TimeoutError:
                return {"status": "still-pending", "reqid": first["reqid"]}

    def refused(self, name: str, hostname: str, token: object, reason: str,
                source: str = "127.0.0.1") -> None:  # fmt: skip
        before = self.guarded()
        got = self.pair(hostname, token, source)
        assert got["status"] == "still-pending", (name, got)
        assert Registry(self.cfg.registry_dir).get(hostname) is None or hostname == "victim.example"
        assert self.guarded() == before, f"{name} changed the registry or the token store"
        wait_until(lambda: self.events.has("pair-token-refuse", reason=reason,
                                           reqid=got["reqid"]), 5, f"{name} logged")  # fmt: skip
        attack(name, f"token {reason}: request {got['reqid']} left pending for an operator; "
               "nothing signed, registered or marked")  # fmt: skip


@pytest.fixture
def site(cfg: DispatcherConfig, listen: Callable[..., Listener], events: Events) -> Site:
    Registry(cfg.registry_dir).register("victim.example", ip="192.0.2.10")
    return Site(cfg, listen(cfg), events)


def test_a_valid_token_approves_once(site: Site) -> None:
    """The control: the same request with a valid token is approved at once."""
    [token] = make(site.cfg, tags={"role": "web"})
    got = site.pair("new1.example", token)
    assert got["status"] == "approved", got
    rec = Registry(site.cfg.registry_dir).get("new1.example")
    assert rec is not None and rec["tags"] == {"role": "web"}
    tid = tk.token_id_of(token)
    assert site.events.has("pair-auto", token_id=tid, reqid=got["reqid"])
    assert [r["state"] for r in tk.listing(site.cfg.ca_dir)] == ["used"]
    site.refused("reused token", "new2.example", token, "used")


def test_expired_and_revoked_tokens(site: Site) -> None:
    [old] = make(site.cfg, expires_in=60, now=time.time() - 120)
    site.refused("expired token", "late.example", old, "expired")
    [revoked] = make(site.cfg)
    tk.revoke(site.cfg.ca_dir, [str(tk.token_id_of(revoked))])
    site.refused("revoked token", "late.example", revoked, "revoked")


def test_forged_tokens(site: Site) -> None:
    [real] = make(site.cfg)
    tid = tk.token_id_of(real)
    site.refused("forged token (known id, guessed secret)", "f1.example",
                 f"cet1.{tid}.{'A' * 43}", "forged")  # fmt: skip
    site.refused("forged token (unknown id)", "f2.example",
                 f"cet1.0123456789.{'A' * 43}", "unknown", source="127.0.0.2")  # fmt: skip
    site.refused("token hash presented as the token", "f3.example", tk.token_hash(real),
                 "malformed", source="127.0.0.3")  # fmt: skip
    site.refused("token of the wrong type", "f4.example", {"id": tid}, "malformed",
                 source="127.0.0.4")  # fmt: skip
    assert site.pair("f5.example", real, "127.0.0.5")["status"] == "approved"  # still good


def test_brute_force_is_counted_and_cut_off(site: Site) -> None:
    """Guesses from one address: each refused and counted; after ``FAIL_LIMIT`` the
    address's tokens are not even looked at, a valid one included."""
    [valid] = make(site.cfg)
    gate = site.lst.server.tokens
    attempts = tokengate.FAIL_LIMIT + 3
    before = site.guarded()
    for n in range(attempts):
        guess = f"cet1.{n:010x}.{'B' * 43}"
        assert ask(site.lst.port, body_for(f"g{n}.example", pairing_token=guess),
                   "127.0.0.8")["status"] == "pending"  # fmt: skip
    wait_until(lambda: sum(gate.refused.values()) >= attempts, 10, "every guess counted")
    assert gate.refused["unknown"] == tokengate.FAIL_LIMIT
    assert gate.refused["rate-limited"] == attempts - tokengate.FAIL_LIMIT
    assert site.guarded() == before
    site.refused("valid token from a brute-forcing address", "g-valid.example", valid,
                 "rate-limited", source="127.0.0.8")  # fmt: skip
    attack("token brute force", f"{attempts} guesses refused and counted "
           f"({dict(gate.refused)}); cut off after {tokengate.FAIL_LIMIT}")  # fmt: skip
    assert site.pair("g-ok.example", valid, "127.0.0.9")["status"] == "approved"


def test_token_approved_agent_cannot_pair_a_second_identity(site: Site) -> None:
    [token, spare] = make(site.cfg, 2)
    assert site.pair("first.example", token)["status"] == "approved"
    site.refused("token-approved agent pairing a second name with its token",
                 "second.example", token, "used")  # fmt: skip
    site.refused("fresh token taking over a registered name", "victim.example", spare,
                 "name-registered")  # fmt: skip
    assert Registry(site.cfg.registry_dir).get("victim.example")["ip"] == "192.0.2.10"  # type: ignore[index]
    assert [r["state"] for r in tk.listing(site.cfg.ca_dir)].count("unused") == 1


def test_one_token_raced_by_many_agents(site: Site) -> None:
    """Eight agents at once with one token: exactly one approved, the others pending."""
    import concurrent.futures as cf

    [token] = make(site.cfg)
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda n: site.pair(f"race{n}.example", token, f"127.0.1.{n + 1}"),
                            range(8)))  # fmt: skip
    states = sorted(g["status"] for g in got)
    assert states == ["approved"] + ["still-pending"] * 7, states
    names = [r["hostname"] for r in Registry(site.cfg.registry_dir).all()]
    assert sum(n.startswith("race") for n in names) == 1
    attack("one token raced by 8 agents", "1 approved, 7 left pending (token used)")


def test_no_token_pairs_as_upstream(site: Site, tmp_path: Path) -> None:
    """Wire compatibility: a request without the field waits for an operator."""
    s, fh, first = open_pairing(site.lst.port, body_for("plain.example"))
    with s, fh:
        assert first["status"] == "pending" and set(first) == {"status", "reqid"}
    assert not site.events.has("pair-token-refuse") and not site.events.has("pair-auto")
