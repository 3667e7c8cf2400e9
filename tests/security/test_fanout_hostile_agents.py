"""Hostile agents in a fan-out: each must fail to hold up or fool the others.

``ced`` fans out on one asyncio loop (:func:`dispatcher.client.aio.drive`): one agent that
trickles a response byte by byte, one that never speaks TLS and one that presents another
CA-signed certificate than the registry pins must each cost only their own deadline or
an error, while honest agents on the same fan-out answer at once. The impostor never
receives the request (its reqid, username, token). Real TLS listeners on loopback
(``ops/lab/tlsagents.py``). Each refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from agent.certinfo import identity_der
from agent.common.tlsconf import client_context, server_context
from dispatcher.client import fanout
from dispatcher.client.blocking import BLOCKING
from dispatcher.client.io import run_blocking
from dispatcher.client.pins import Pins
from dispatcher.client.wire import SessionCache
from dispatcher.registry import Target
from ops.lab.pki import Issued, TestCA
from ops.lab.tlsagents import TlsAgents
from tests.support.attacks import attack, show_attacks  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.integration

HONEST = 8
DEADLINE = 10.0  # the honest agents answer far within it, even on a machine at load 100


def pins_of(cert: Issued) -> Pins:
    serial, pubkey = identity_der(ssl.PEM_cert_to_DER_cert(Path(cert.cert).read_text()))
    return Pins((serial,), pubkey)


def test_hostile_agents_cost_only_their_own_deadline(tmp_path: Path) -> None:
    pki = TestCA(tmp_path / "pki")
    disp = pki.issue("dispatcher", cn="ctrl-exec-dispatcher")
    honest_cert = pki.issue("agent", cn="web.test")
    impostor_cert = pki.issue("impostor", cn="web.test")  # CA-signed, another serial
    cctx = client_context(str(pki.cert_path), str(disp.cert), str(disp.key))
    lab = TlsAgents()
    try:
        honest_ctx = server_context(str(honest_cert.cert), str(honest_cert.key),
                                    str(pki.cert_path))  # fmt: skip
        honest = lab.add(honest_ctx)
        trickler = lab.add(honest_ctx, "trickle")
        silent = lab.add(None, "silent")
        impostor = lab.add(server_context(str(impostor_cert.cert), str(impostor_cert.key),
                                          str(pki.cert_path)))  # fmt: skip
        pins = pins_of(honest_cert)
        hostile = [Target("trickler", "127.0.0.1", trickler.port, pins=pins),
                   Target("silent", "127.0.0.1", silent.port, pins=pins),
                   Target("impostor", "127.0.0.1", impostor.port, pins=pins)]  # fmt: skip
        targets = hostile + [Target(f"web{i}", "127.0.0.1", honest.port, pins=pins)
                             for i in range(HONEST)]  # fmt: skip
        order: list[tuple[str, float]] = []
        t0 = time.monotonic()

        def told(res: dict[str, Any], outcome: str) -> None:
            order.append((res["host"], time.monotonic() - t0))

        reach = fanout.Reach(cctx, DEADLINE, len(targets), io=BLOCKING, sessions=SessionCache())
        out = run_blocking(fanout.run_all(targets, "deploy", ["--now"], "r-hostile", "alice",
                                          "secret-token", reach, on_result=told))  # fmt: skip
        wall = time.monotonic() - t0
    finally:
        lab.stop()
    by_host = {r["host"]: r for r in out}
    slow = {h: r for h, r in by_host.items() if h.startswith("web") and r.get("status") != "ok"}
    assert not slow, slow
    done_at = dict(order)
    last_honest = max(done_at[f"web{i}"] for i in range(HONEST))
    # the honest answers were not queued behind the hostile connections' deadlines
    assert last_honest < done_at["trickler"] and last_honest < done_at["silent"]
    assert wall < DEADLINE * 3
    assert by_host["trickler"]["error"] == f"read timeout after {DEADLINE:g}s"
    attack("trickling response", f"{by_host['trickler']['error']}; honest agents done "
           f"after {last_honest:.2f} s")  # fmt: skip
    assert by_host["silent"]["error"] == "host '127.0.0.1' did not respond - connection timed out"
    attack("silent listener", by_host["silent"]["error"])
    assert by_host["impostor"]["error"].startswith("agent certificate does not match the registry")
    assert impostor.seen == []  # no request line, no body: reqid, username, token stay ours
    attack("impostor certificate", f"{by_host['impostor']['error'][:70]}...; request never sent")
    assert honest.seen and len(honest.seen) == HONEST
