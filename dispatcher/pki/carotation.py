"""CA rotation (``ced rotate-ca``): a new CA replaces the old one without breaking trust.

Intent first, resumable: every step is recorded in ``<ca_dir>/ca-rotation.json`` (under
``ca_dir``, so generations replicate it with the new CA) before agents are told, and
:func:`advance` carries out whatever the recorded phase still needs, so any leader can
resume it. Phases:

1. ``bundle`` (:func:`start`): the new CA is created in ``<ca_dir>/ca-next/``; the
   dispatcher's ``ca`` file becomes the bundle old + new; every registered agent gets the
   bundle through ``POST /ca-bundle`` (``add``; authenticated: only a trusted dispatcher
   serial). Agents that answer 404 run upstream's agent, which cannot take a bundle: they
   are reported ``upstream`` (never dropped silently); unreachable ones ``offline``.
2. ``switch``: once every agent holds the bundle, the new CA becomes the signing CA
   (``ca.key``; ``ca.crt`` = new + old, so the dispatcher still verifies agents with
   old-CA certificates); the old pair is kept in ``<ca_dir>/ca-old/``.
3. ``renew``: every agent's certificate is renewed under the new CA
   (:func:`dispatcher.pki.renewal.renew`); the agent promotes the staged certificate at
   its next reload (SIGHUP) or restart, as upstream.
4. ``dispatcher``: the dispatcher certificate is rotated under the new CA
   (:func:`dispatcher.pki.rotation.rotate`: broadcast with the old credentials first).
5. ``drop`` (``--finish``): ``/ca-bundle``
   ``drop`` of the old CA on every agent; an agent still presenting an old-CA
   certificate refuses ("renew first") and stays listed. When all dropped, the
   dispatcher's ``ca.crt`` holds the new CA only and ``ca-old/`` is deleted: ``done``.

Operator certificates: when ``<ca_dir>/operator-ca.key`` exists they have their own CA;
otherwise operator certificates issued by the old CA stop working at ``done`` — both are
reported by :func:`status`; reissuing them is the operator's job.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.common import logfmt
from agent.common.errors import CtrlExecError
from dispatcher.client.aio import AgentReply, AgentRequest, call
from dispatcher.pki import ca as pki
from dispatcher.registry import DEFAULT_PORT, RegistryError, Target, resolve
from dispatcher.statewrite import write_json

if TYPE_CHECKING:
    from dispatcher.core import Dispatcher

ev = logfmt.event
STATE = "ca-rotation.json"
NEXT, OLD = "ca-next", "ca-old"
PHASES = ("bundle", "switch", "renew", "dispatcher", "drop", "done")
STATUSES = ("pending", "offline", "upstream", "bundled", "renewed", "dropped")


class CARotationError(CtrlExecError):
    """The CA rotation cannot proceed; the message says why and what to do."""


@dataclass
class CARotation:
    phase: str
    old_fingerprint: str
    new_fingerprint: str
    started_at: float
    agents: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> status, error

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "old_fingerprint": self.old_fingerprint,
                "new_fingerprint": self.new_fingerprint, "started_at": self.started_at,
                "agents": self.agents}  # fmt: skip

    @classmethod
    def from_json(cls, d: Any) -> CARotation:
        if not isinstance(d, dict) or d.get("phase") not in PHASES:
            raise ValueError("ca-rotation state is malformed")
        agents = d.get("agents") or {}
        if not isinstance(agents, dict):
            raise ValueError("ca-rotation agents is not an object")
        return cls(str(d["phase"]), str(d.get("old_fingerprint") or ""),
                   str(d.get("new_fingerprint") or ""), float(d.get("started_at") or 0),
                   {str(k): {"status": str(v.get("status", "pending")),
                             "error": str(v.get("error", ""))}
                    for k, v in agents.items() if isinstance(v, dict)})  # fmt: skip

    def names(self, *statuses: str) -> list[str]:
        return sorted(n for n, a in self.agents.items() if a["status"] in statuses)

    def mark(self, name: str, status: str, error: str = "") -> None:
        self.agents[name] = {"status": status, "error": error}


def state_path(d: Dispatcher) -> Path:
    return Path(d.cfg.ca_dir) / STATE


def load(d: Dispatcher) -> CARotation | None:
    try:
        raw = state_path(d).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return CARotation.from_json(json.loads(raw))
    except ValueError as exc:
        raise CARotationError(f"{state_path(d)}: {exc}; fix or remove it") from None


def save(d: Dispatcher, st: CARotation) -> None:
    write_json(d.writer, state_path(d), st.to_json(), 0o640)


def _fp(cert_pem: bytes) -> str:
    from cryptography import x509

    from agent.common.certs import fingerprint

    return fingerprint(x509.load_pem_x509_certificate(cert_pem))


def _certs(path: Path) -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return [c.public_bytes(serialization.Encoding.PEM)
            for c in x509.load_pem_x509_certificates(path.read_bytes())]  # fmt: skip


# ----- agent calls -------------------------------------------------------------------------


def _targets(d: Dispatcher, names: list[str]) -> dict[str, Target]:
    out: dict[str, Target] = {}
    for name in names:
        try:
            for t in resolve(d.registry, [name], DEFAULT_PORT):
                out[name] = t
        except RegistryError as exc:
            ev("ca-rotation-warn", logging.WARNING, agent=name, error=exc)
    return out


def _classify(reply: AgentReply) -> tuple[str, str]:
    """``(status, error)`` of a ``/ca-bundle`` answer: ok, upstream (404), offline, error."""
    if reply.code == 404:
        return "upstream", "the agent has no /ca-bundle endpoint (upstream agent)"
    if reply.code is None:
        return "offline", reply.error
    body = reply.body or {}
    if reply.code == 200 and body.get("status") == "ok":
        return "ok", ""
    return "error", str(body.get("error") or reply.error or f"HTTP {reply.code}")


async def _post_all(d: Dispatcher, names: list[str], body: dict[str, Any],
                    ctx: ssl.SSLContext) -> dict[str, tuple[str, str]]:  # fmt: skip
    from dispatcher.client.fanout import fan_out

    targets = _targets(d, names)

    async def one(t: Target) -> tuple[str, tuple[str, str]]:
        reply = await call(AgentRequest.to(t, "POST", "/ca-bundle", body, ctx,
                                           d.cfg.read_timeout))  # fmt: skip
        return t.name, _classify(reply)

    def on_error(t: Target, exc: Exception) -> tuple[str, tuple[str, str]]:
        return t.name, ("offline", f"{type(exc).__name__}: {exc}")

    results = dict(await fan_out(list(targets.values()), one, d.cfg.max_parallel, on_error))  # type: ignore[arg-type]
    for name in names:
        results.setdefault(name, ("offline", "not resolvable"))
    return results


# ----- the phases --------------------------------------------------------------------------


def record(d: Dispatcher, now: float | None = None) -> CARotation:
    """The rotation in progress, or a new one recorded (intent first: the new CA in
    ``ca-next/``, ``ca-rotation.json``, the dispatcher trusting both); no agent is told."""
    now = time.time() if now is None else now
    if (cur := load(d)) is not None and cur.phase != "done":
        return cur
    ca_dir = Path(d.cfg.ca_dir)
    live = Path(d.cfg.ca or ca_dir / "ca.crt")
    old_pem = _certs(live)[0]
    nxt = ca_dir / NEXT
    if (nxt / "ca.key").exists():  # left by an interrupted start: reuse it
        new = pki.load_ca(nxt)
    else:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        new = pki.create_ca(nxt, writer=d.writer, cn=f"{pki.CA_CN} {stamp}")
    new_pem = new.pem.encode()
    st = CARotation("bundle", _fp(old_pem), _fp(new_pem), now,
                    {n: {"status": "pending", "error": ""} for n in d.registry.names()})  # fmt: skip
    save(d, st)
    d.writer.write(live, old_pem + new_pem, 0o644)  # we verify agents under either CA
    ev("ca-rotation-start", old=st.old_fingerprint, new=st.new_fingerprint,
       agents=len(st.agents))  # fmt: skip
    return st


async def start(d: Dispatcher, now: float | None = None) -> dict[str, Any]:
    """Record a new rotation (refused while one is in progress), then :func:`advance`."""
    if (cur := load(d)) is not None and cur.phase != "done":
        raise CARotationError(f"a CA rotation is already in phase {cur.phase}; "
                              "see 'ced rotate-ca --status'")  # fmt: skip
    record(d, now)
    return await advance(d)


async def _bundle(d: Dispatcher, st: CARotation) -> None:
    ca_dir = Path(d.cfg.ca_dir)
    bundle = b"".join(_certs(Path(d.cfg.ca or ca_dir / "ca.crt"))).decode()
    todo = st.names("pending", "offline", "upstream")
    if todo:
        res = await _post_all(d, todo, {"action": "add", "bundle": bundle}, d.client_ctx())
        for name, (status, error) in res.items():
            st.mark(name, "bundled" if status == "ok" else
                    ("pending" if status == "error" else status), error)  # fmt: skip
        save(d, st)
    if not st.names("pending", "offline", "upstream"):
        _switch(d, st)


def _switch(d: Dispatcher, st: CARotation) -> None:
    """The new CA signs from now on; the old pair is kept until the end."""
    ca_dir = Path(d.cfg.ca_dir)
    live_crt = Path(d.cfg.ca or ca_dir / "ca.crt")
    old_key, nxt = (ca_dir / "ca.key").read_bytes(), ca_dir / NEXT
    old_pem = next(c for c in _certs(live_crt) if _fp(c) == st.old_fingerprint)
    new_pem = (nxt / "ca.crt").read_bytes()
    d.writer.write(ca_dir / OLD / "ca.key", old_key, 0o600)
    d.writer.write(ca_dir / OLD / "ca.crt", old_pem, 0o644)
    d.writer.write(ca_dir / "ca.key", (nxt / "ca.key").read_bytes(), 0o600)
    d.writer.write(live_crt, new_pem + old_pem, 0o644)  # new first: load_ca signs with it
    d.writer.delete(nxt / "ca.key")
    d.writer.delete(nxt / "ca.crt")
    st.phase = "renew"
    save(d, st)
    ev("ca-rotation-switch", new=st.new_fingerprint)


async def _renew(d: Dispatcher, st: CARotation) -> None:
    from dispatcher.pki.renewal import renew

    todo = st.names("bundled")
    targets = _targets(d, todo)
    for name in todo:
        t = targets.get(name)
        if t is None:
            st.mark(name, "bundled", "not resolvable")
            continue
        res = await renew(d, t)
        if res.get("status") == "ok":
            st.mark(name, "renewed")
        else:
            st.mark(name, "bundled", str(res.get("error") or "renewal failed"))
    save(d, st)
    if not st.names("bundled"):
        st.phase = "dispatcher"
        save(d, st)


async def _dispatcher(d: Dispatcher, st: CARotation) -> None:
    from dispatcher.pki import rotation

    await rotation.rotate(d)  # the new dispatcher cert is signed by the new CA
    st.phase = "drop"
    save(d, st)


async def _drop(d: Dispatcher, st: CARotation) -> None:
    todo = st.names("renewed")
    if todo:
        res = await _post_all(d, todo, {"action": "drop", "fingerprint": st.old_fingerprint},
                              d.client_ctx())  # fmt: skip
        for name, (status, error) in res.items():
            st.mark(name, "dropped" if status == "ok" else "renewed", error)
        save(d, st)
    if st.names("renewed"):
        return
    ca_dir = Path(d.cfg.ca_dir)
    live_crt = Path(d.cfg.ca or ca_dir / "ca.crt")
    keep = [c for c in _certs(live_crt) if _fp(c) != st.old_fingerprint]
    d.writer.write(live_crt, b"".join(keep), 0o644)
    d.writer.delete(ca_dir / OLD / "ca.key")
    d.writer.delete(ca_dir / OLD / "ca.crt")
    st.phase = "done"
    save(d, st)
    ev("ca-rotation-done", new=st.new_fingerprint, agents=len(st.agents))


async def step(d: Dispatcher, finish: bool = False) -> str:
    """Carry out one phase of the recorded rotation (resumable); the phase after it."""
    st = load(d)
    if st is None:
        raise CARotationError("no CA rotation in progress (start one with 'ced rotate-ca')")
    if st.phase == "bundle":
        await _bundle(d, st)
    elif st.phase == "switch":
        _switch(d, st)
    elif st.phase == "renew":
        await _renew(d, st)
    elif st.phase == "dispatcher":
        await _dispatcher(d, st)
    elif st.phase == "drop" and finish:
        await _drop(d, st)
    after = load(d)
    return after.phase if after is not None else st.phase


def dispatcher_rotated(d: Dispatcher) -> None:
    """The ``dispatcher`` phase was carried out by the caller (a cluster's intent-first
    rotation): move on to ``drop``."""
    st = load(d)
    if st is not None and st.phase == "dispatcher":
        st.phase = "drop"
        save(d, st)


async def advance(d: Dispatcher, finish: bool = False) -> dict[str, Any]:
    """Carry out what the recorded phase still needs, phase after phase; the status.

    ``drop`` runs only with ``finish`` (``ced rotate-ca --finish``): whether each agent
    already presents its renewed certificate is checked by the agent itself.
    """
    for _ in range(len(PHASES)):  # each step moves at most one phase
        st = load(d)
        before = st.phase if st is not None else None
        if await step(d, finish) == before:
            break
    return status(d)


def status(d: Dispatcher) -> dict[str, Any]:
    """Phase and the agents by status (``done`` = every step for that agent is over)."""
    st = load(d)
    if st is None:
        return {"phase": None}
    ca_dir = Path(d.cfg.ca_dir)
    by = {s: st.names(s) for s in STATUSES}
    out: dict[str, Any] = {
        **{k: v for k, v in st.to_json().items() if k != "agents"},
        "done": by["dropped"] if st.phase in ("drop", "done") else by["renewed"],
        "pending": sorted(set(by["pending"]) | set(by["bundled"])
                          | (set(by["renewed"]) if st.phase == "drop" else set())),
        "offline": by["offline"], "upstream": by["upstream"], "renewed": by["renewed"],
        "errors": {n: a["error"] for n, a in st.agents.items() if a["error"]},
    }  # fmt: skip
    if (ca_dir / "operator-ca.key").exists():
        out["operator"] = "operator certificates have their own CA (operator-ca.key): unchanged"
    else:
        out["operator"] = ("operator certificates issued by the old CA stop working once "
                           "the rotation is done: reissue them under the new CA")  # fmt: skip
    return out
