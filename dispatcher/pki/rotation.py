"""Dispatcher certificate rotation (spec 6), in the order that keeps every agent trusting us.

Upstream overwrites the dispatcher cert before broadcasting, so its ``/rotate-serial``
broadcast presents a serial no agent trusts yet (spec 6.4), and its retirement step is
practically never reached (spec 6.3). Here:

1. the old cert/key are kept as ``<cert>.prev`` / ``<key>.prev`` and the new pair is
   staged as ``<cert>.next`` / ``<key>.next`` (so a crash never loses the new key);
2. ``rotation.json`` is written with ``phase = announcing`` (the intent: new serial, old
   serial, the staged pair) and every registry agent marked ``pending`` (one batch):
   :func:`prepare`. In a cluster the intent is also recorded in etcd and acknowledged by
   replication before step 3 (:mod:`dispatcher.ha.rotation_intent`), so a new leader can
   finish it (:func:`finish`) or, if the pair is lost, retire the orphan serial from every
   agent (:func:`retire_orphan`);
3. ``{"serial": <new>, "action": "add"}`` goes to every pending/unknown agent **with the
   old credentials** (still trusted); successes become ``current``;
4. only then is the new pair installed at ``cert`` / ``key`` and ``phase`` dropped
   (:func:`finish`);
5. :func:`broadcast` retries stragglers while the overlap lasts (old credentials first,
   then the installed ones if an agent refuses the old serial);
6. :func:`retire` removes the old serial, with the new cert, from every ``current`` agent
   once the overlap is over, or earlier once every registered agent acknowledged the new
   serial; then ``previous_serial`` is dropped and the kept old key deleted;
7. :func:`expire_stale` marks agents still ``pending`` after the overlap ``stale``.

Every write (``rotation.json``, registry records, cert and key files) goes through
``d.writer``, the seam the HA work fences. Serials are sent as plain lower-case hex of the
certificate serial: the agent canonicalises them exactly as it canonicalises the serial of
the certificate we present, so both sides agree even for upstream's all-digit serials.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.common import logfmt
from agent.common.errors import CtrlExecError
from agent.common.serial import serial_to_hex
from dispatcher.client.aio import AgentReply, AgentRequest, call
from dispatcher.pki import rotation_state as rs
from dispatcher.pki.rotation_state import RotationState, format_iso
from dispatcher.registry import DEFAULT_PORT, RegistryError, Target, resolve

if TYPE_CHECKING:
    from dispatcher.core import Dispatcher

DAY = 86400
KEY_MODE = 0o600
CERT_MODE = 0o644
BROADCAST_STATUSES = ("pending", "unknown")
ev = logfmt.event


class RotationError(CtrlExecError):
    """Rotation cannot proceed (no cert, no CA, unreadable material)."""


PAUSE_ENV = "CTRL_EXEC_TEST_PAUSE_AT"
PAUSE_SECONDS = 120.0


def pause_point(step: str) -> None:
    """Fault injection for the failover tests: when ``$CTRL_EXEC_TEST_PAUSE_AT`` names
    ``step`` (``rotation-intent``: the intent is acknowledged, no agent told;
    ``rotation-told``: agents were told, the new cert is not installed), log
    ``test-pause`` and stall this thread for up to :data:`PAUSE_SECONDS` so the test can
    kill -9 the process at exactly that point. Unset in production: a no-op."""
    if os.environ.get(PAUSE_ENV) == step:
        ev("test-pause", logging.WARNING, step=step, pid=os.getpid())
        time.sleep(PAUSE_SECONDS)


# ----- pure decision logic -------------------------------------------------------------


def days_left(not_after: float, now: float | None = None) -> int:
    """Whole days until ``not_after`` (truncated toward zero, as upstream's ``int``)."""
    now = time.time() if now is None else now
    return int((not_after - now) / DAY)


def rotation_due(left: int, renewal_days: int) -> bool:
    """Upstream rotates when ``days_left <= cert_renewal_days``."""
    return left <= renewal_days


def acknowledged(record: dict[str, Any], current_serial: str) -> bool:
    """The agent confirmed ``current_serial`` (status ``current`` with that serial)."""
    return record.get("serial_status") == "current" and serial_to_hex(
        str(record.get("dispatcher_serial") or "")
    ) == serial_to_hex(current_serial)


def all_acknowledged(records: Iterable[dict[str, Any]], current_serial: str) -> bool:
    return all(acknowledged(r, current_serial) for r in records)


def retirement_reason(
    state: RotationState | None,
    records: Sequence[dict[str, Any]],
    now: float | None = None,
    force: bool = False,
) -> str | None:
    """Why the previous serial may be retired now, or None if it must stay trusted.

    ``forced``; ``overlap-expired`` once ``overlap_expires`` has passed; or
    ``all-acknowledged`` (early) once every registered agent is ``current`` on the new
    serial.
    """
    if state is None or not state.previous_serial:
        return None
    if force:
        return "forced"
    if state.overlap_over(now):
        return "overlap-expired"
    if all_acknowledged(records, state.current_serial):
        return "all-acknowledged"
    return None


def stale_candidates(
    state: RotationState | None, records: Iterable[dict[str, Any]], now: float | None = None
) -> list[str]:
    """Agents still ``pending`` once the overlap window of ``state`` has passed."""
    if state is None or not state.overlap_over(now):
        return []
    return [str(r.get("hostname")) for r in records if r.get("serial_status") == "pending"]


# ----- credentials -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Paths:
    cert: Path
    key: Path

    @classmethod
    def of(cls, d: Dispatcher, suffix: str) -> _Paths:
        return cls(Path(f"{d.cfg.cert}{suffix}"), Path(f"{d.cfg.key}{suffix}"))


def prev_paths(d: Dispatcher) -> tuple[Path, Path]:
    """Where the pre-rotation cert and key are kept until retirement."""
    p = _Paths.of(d, ".prev")
    return p.cert, p.key


def next_paths(d: Dispatcher) -> tuple[Path, Path]:
    """Where a new pair waits between generation and installation."""
    p = _Paths.of(d, ".next")
    return p.cert, p.key


def _serial_of(path: Path | str) -> str | None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return format(cert.serial_number, "x")


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and serial_to_hex(a) == serial_to_hex(b)


def installed_serial(d: Dispatcher) -> str | None:
    return _serial_of(d.cfg.cert)


def _ctx(d: Dispatcher, cert: Path | str, key: Path | str) -> ssl.SSLContext | None:
    from agent.common.tlsconf import client_context

    try:
        return client_context(d.cfg.ca, str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        ev("serial-broadcast-error", logging.WARNING, error=f"credentials {cert}: {exc}")
        return None


def _prev_ctx(d: Dispatcher, state: RotationState) -> ssl.SSLContext | None:
    """Client context presenting the previous serial, if it is still kept."""
    cert, key = prev_paths(d)
    if not state.previous_serial or not _same(_serial_of(cert), state.previous_serial):
        return None
    return _ctx(d, cert, key)


def _current_ctx(d: Dispatcher, serial: str) -> ssl.SSLContext | None:
    """Client context from ``cert``/``key`` if the installed cert presents ``serial``."""
    if not _same(installed_serial(d), serial):
        return None
    return _ctx(d, d.cfg.cert, d.cfg.key)


def _write_pair(d: Dispatcher, dest: _Paths, cert_pem: bytes, key_pem: bytes,
                like: _Paths | None = None) -> None:  # fmt: skip
    """Key first, then cert, through the writer; ownership copied from ``like``."""
    for path, data, mode, ref in (
        (dest.key, key_pem, KEY_MODE, like.key if like else None),
        (dest.cert, cert_pem, CERT_MODE, like.cert if like else None),
    ):
        if ref is not None:
            with contextlib.suppress(OSError):
                mode = os.stat(ref).st_mode & 0o777
        d.writer.write(path, data, mode)
        if ref is not None:
            with contextlib.suppress(OSError):
                st = os.stat(ref)
                os.chown(path, st.st_uid, st.st_gid)


def _new_pair(d: Dispatcher) -> tuple[bytes, bytes, str]:
    """A new EC P-256 dispatcher key and CA-signed cert (PEM), and its hex serial."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from dispatcher.pki import ca as pki

    ca = pki.load_ca(d.cfg.ca_dir, d.cfg.ca)
    key = ec.generate_private_key(ec.SECP256R1())
    from dispatcher.pki.names import cert_names

    cert = pki.leaf(ca, key.public_key(), pki.DISPATCHER_CN, d.cfg.cert_days,
                     names=cert_names(d.cfg))  # fmt: skip
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, format(cert.serial_number, "x")


def _install(d: Dispatcher, cert_pem: bytes, key_pem: bytes) -> None:
    live = _Paths(Path(d.cfg.cert), Path(d.cfg.key))
    _write_pair(d, live, cert_pem, key_pem, like=live)
    nxt = _Paths.of(d, ".next")
    d.writer.delete(nxt.cert)
    d.writer.delete(nxt.key)


def _recover_install(d: Dispatcher, state: RotationState | None) -> bool:
    """Finish an installation interrupted by a crash (``.next`` holds the current serial)."""
    if state is None or state.unfinished or _same(installed_serial(d), state.current_serial):
        return False  # an unfinished rotation is installed by finish(), after its broadcast
    nxt = _Paths.of(d, ".next")
    if not _same(_serial_of(nxt.cert), state.current_serial):
        return False
    try:
        cert_pem, key_pem = nxt.cert.read_bytes(), nxt.key.read_bytes()
    except OSError:
        return False
    _install(d, cert_pem, key_pem)
    ev("cert-install", serial=state.current_serial, reason="completing interrupted rotation")
    return True


# ----- agent calls -----------------------------------------------------------------------


def _targets(d: Dispatcher, names: Iterable[str]) -> list[Target]:
    out: list[Target] = []
    for name in names:
        try:
            out.extend(resolve(d.registry, [name], DEFAULT_PORT))
        except RegistryError as exc:
            ev("serial-broadcast-error", logging.WARNING, agent=name, error=exc)
    return out


def _reply_error(reply: AgentReply) -> str:
    if reply.error:
        return reply.error
    if reply.body is None:
        return "invalid JSON response"
    if reply.body.get("status") != "ok":
        return str(reply.body.get("error") or f"status {reply.body.get('status')}")
    return ""


async def _send_serial(
    d: Dispatcher, targets: Sequence[Target], serial: str, action: str,
    ctxs: Sequence[ssl.SSLContext], timeout: float | None = None,
) -> dict[str, str]:  # fmt: skip
    """``/rotate-serial`` to every target in parallel; ``{name: error}`` ("" = success).

    Each context in ``ctxs`` is tried in turn while the agent answers 403 (it does not
    trust that serial); any other failure is final for this attempt.
    """
    from dispatcher.client.fanout import fan_out

    body = {"serial": serial, "action": action}

    async def one(t: Target) -> tuple[str, str]:
        err = "no credentials"
        for ctx in ctxs:
            reply = await call(AgentRequest.to(t, "POST", "/rotate-serial", body, ctx,
                                               timeout or d.cfg.read_timeout))  # fmt: skip
            err = _reply_error(reply)
            if not err or reply.code != 403:
                break
        return t.name, err

    def on_error(t: Target, exc: Exception) -> tuple[str, str]:
        return t.name, f"internal error: {exc}"

    results = await fan_out(targets, one, d.cfg.max_parallel, on_error)  # type: ignore[arg-type]
    return dict(results)


async def _broadcast(d: Dispatcher, state: RotationState, now: float,
                     pause: bool = False, timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
    records = d.registry.all()
    names = [
        str(r["hostname"]) for r in records
        if (r.get("serial_status") or "unknown") in BROADCAST_STATUSES and r.get("hostname")
    ]  # fmt: skip
    targets = _targets(d, names)
    if not targets:
        return {"serial": state.current_serial, "updated": [], "failed": []}
    serial = state.current_serial
    ev("serial-broadcast", hosts=",".join(t.name for t in targets), serial=serial,
       dispatcher=d.cfg.dispatcher_id)  # fmt: skip
    ctxs = [c for c in (_prev_ctx(d, state), _current_ctx(d, serial)) if c is not None]
    if not ctxs:  # no .prev kept (an old rotation's leftovers): what is installed
        ctxs = [c for c in (_ctx(d, d.cfg.cert, d.cfg.key),) if c is not None]
    outcome = await _send_serial(d, targets, serial, "add", ctxs, timeout)
    if pause and any(not err for err in outcome.values()):
        pause_point("rotation-told")
    updated = [n for n, err in outcome.items() if not err]
    failed = [{"host": n, "error": err} for n, err in outcome.items() if err]
    if updated:
        d.registry.update_many(updated, serial_status="current", dispatcher_serial=serial,
                               serial_confirmed=format_iso(now))  # fmt: skip
    for name in updated:
        ev("serial-confirmed", agent=name)
    for f in failed:
        ev("serial-broadcast-fail", logging.WARNING, agent=f["host"], error=f["error"])
    return {"serial": serial, "updated": updated, "failed": failed}


# ----- public operations -------------------------------------------------------------------


def unacknowledged(d: Dispatcher, state: RotationState) -> list[str]:
    """Registered agents that have not acknowledged ``state.current_serial``."""
    return sorted(str(r.get("hostname")) for r in d.registry.all()
                  if not acknowledged(r, state.current_serial))  # fmt: skip


async def prepare(d: Dispatcher, now: float | None = None) -> tuple[RotationState, int]:
    """Record a rotation as intent; no agent is told yet. ``(state, agents pending)``.

    Keeps the old pair as ``.prev``, stages the new one as ``.next``, writes
    ``rotation.json`` with ``phase = announcing`` and marks every agent ``pending``.
    Raises RotationError (logged ``cert-rotation-fail``) if nothing was changed.
    """
    now = time.time() if now is None else now
    cfg = d.cfg
    state = rs.load(cfg.rotation_file)
    if state is not None and state.unfinished:  # finish (or undo) the interrupted one first
        ev("cert-rotation-warn", logging.WARNING, serial=state.current_serial,
           reason="an earlier rotation is unfinished; finishing it before rotating")  # fmt: skip
        await broadcast(d, now)
        state = rs.load(cfg.rotation_file)
    _recover_install(d, state)
    if state is not None and state.previous_serial:
        # A second rotation while the first one's old serial is still trusted. An agent
        # that never acknowledged the current serial trusts only the previous one, whose
        # pair this rotation is about to drop: it would be cut off for good. Tell them
        # first (with the kept previous pair); refuse while any still cannot be told.
        if not state.overlap_over(now):
            if unacknowledged(d, state):
                await broadcast(d, now)
            behind = unacknowledged(d, state)
            if behind:
                shown = ", ".join(behind[:10]) + (" ..." if len(behind) > 10 else "")
                error = (f"{len(behind)} agent(s) have not acknowledged serial "
                         f"{state.current_serial} yet and trust only {state.previous_serial}: "
                         f"{shown}. A new rotation now would cut them off; retry once they "
                         "are reachable (ced maintain tells them), or unpair them")  # fmt: skip
                ev("cert-rotation-fail", logging.ERROR, error=error)
                raise RotationError(f"rotation refused: {error}")
        # Every agent has the current serial: retire the previous one first, or it would
        # stay trusted on agents for good.
        ev("cert-rotation-warn", logging.WARNING, serial=state.previous_serial,
           reason="previous serial not yet retired; retiring it before rotating")  # fmt: skip
        await retire(d, now, force=True)
    live = _Paths(Path(cfg.cert), Path(cfg.key))
    try:
        old_cert_pem, old_key_pem = live.cert.read_bytes(), live.key.read_bytes()
        old_serial = _serial_of(live.cert)
        if old_serial is None:
            raise RotationError(f"cannot read the dispatcher certificate {cfg.cert}")
        new_cert_pem, new_key_pem, new_serial = _new_pair(d)
    except (OSError, ValueError, CtrlExecError) as exc:
        error = f"{exc}" if isinstance(exc, CtrlExecError) else f"{exc.__class__.__name__}: {exc}"
        ev("cert-rotation-fail", logging.ERROR, error=error)
        raise RotationError(f"rotation failed: {error}") from None

    # Keep the old credentials (they authorise the broadcast) and stage the new pair.
    _write_pair(d, _Paths.of(d, ".prev"), old_cert_pem, old_key_pem, like=live)
    _write_pair(d, _Paths.of(d, ".next"), new_cert_pem, new_key_pem, like=live)
    state = RotationState.new(new_serial, old_serial, cfg.cert_overlap_days, now).announcing()
    rs.save(state, cfg.rotation_file, d.writer)
    names = d.registry.names()
    pending = d.registry.update_many(names, serial_status="pending",
                                     serial_broadcast=format_iso(now))  # fmt: skip
    ev("cert-rotated", old_serial=old_serial, new_serial=new_serial,
       overlap_expires=state.overlap_expires, agents=pending, phase=state.phase)  # fmt: skip
    return state, pending


def has_material(d: Dispatcher, state: RotationState) -> bool:
    """This instance holds the key pair of ``state.current_serial`` (staged or installed)."""
    nxt = _Paths.of(d, ".next")
    staged = _same(_serial_of(nxt.cert), state.current_serial) and nxt.key.is_file()
    return staged or _same(installed_serial(d), state.current_serial)


async def finish(d: Dispatcher, state: RotationState, now: float | None = None, *,
                 pause: bool = True) -> dict[str, Any]:  # fmt: skip
    """Carry out a recorded rotation: broadcast the new serial (old credentials), install
    the staged pair, mark the rotation finished. Idempotent: a new leader calls it again
    for an intent its predecessor did not finish (``pause`` off: no test pause point).
    Raises RotationError if the key pair of the new serial is not here.
    """
    now = time.time() if now is None else now
    if not has_material(d, state):
        raise RotationError(f"the key pair of serial {state.current_serial} is not here")
    nxt = _Paths.of(d, ".next")
    staged: tuple[bytes, bytes] | None = None
    if not _same(installed_serial(d), state.current_serial):
        try:
            staged = nxt.cert.read_bytes(), nxt.key.read_bytes()
        except OSError as exc:
            raise RotationError(f"cannot read the staged pair: {exc}") from None
    try:
        report = await _broadcast(d, state, now, pause=pause)
    finally:  # every agent still trusts the old serial too, so installing is always safe
        if staged is not None:
            _install(d, *staged)
    rs.save(state.finished(), d.cfg.rotation_file, d.writer)
    ev("cert-install", serial=state.current_serial, updated=len(report["updated"]),
       failed=len(report["failed"]))  # fmt: skip
    return report


async def rotate(d: Dispatcher, now: float | None = None) -> dict[str, Any]:
    """Rotate the dispatcher certificate on one host: :func:`prepare` then :func:`finish`
    (in a cluster :mod:`dispatcher.ha.rotation_intent` acknowledges the intent between the
    two). Raises RotationError (logged ``cert-rotation-fail``) if nothing was changed.
    """
    now = time.time() if now is None else now
    state, pending = await prepare(d, now)
    report = await finish(d, state, now)
    return result(state, pending, report)


def result(state: RotationState, pending: int, report: dict[str, Any]) -> dict[str, Any]:
    """The ``rotate-cert`` document."""
    return {
        "rotated": 1,
        "new_serial": state.current_serial,
        "old_serial": state.previous_serial,
        "overlap_expires": state.overlap_expires,
        "agents_pending": pending,
        "updated": report["updated"],
        "failed": report["failed"],
    }


async def retire_orphan(d: Dispatcher, orphan: str, now: float | None = None) -> dict[str, Any]:
    """Undo a recorded rotation whose key pair is lost: ``remove`` the orphan serial from
    every registered agent (upstream agents accept it; an absent serial is a no-op), with
    the installed credentials (and the kept ``.prev`` ones); registry records naming the
    orphan go back to the installed serial; ``rotation.json`` naming it is rewritten.
    ``{serial, removed, failed}``; agents in ``failed`` may still trust it (retry).
    """
    now = time.time() if now is None else now
    cfg = d.cfg
    installed = installed_serial(d)
    if installed is None or _same(installed, orphan):
        raise RotationError(f"cannot retire serial {orphan}: it is the installed one")
    ctxs = [c for c in (_ctx(d, cfg.cert, cfg.key), _prev_any_ctx(d, orphan)) if c is not None]
    records = d.registry.all()
    names = [str(r["hostname"]) for r in records if r.get("hostname")]
    ev("serial-orphan-retire", serial=orphan, hosts=",".join(names), installed=installed)
    outcome = await _send_serial(d, _targets(d, names), orphan, "remove", ctxs) if names else {}
    failed = [{"host": n, "error": e} for n, e in outcome.items() if e]
    failed += [{"host": n, "error": "not resolvable"} for n in names if n not in outcome]
    for f in failed:
        ev("serial-orphan-retire-error", logging.WARNING, agent=f["host"], error=f["error"])
    removed = [n for n, e in outcome.items() if not e]
    naming = [str(r["hostname"]) for r in records
              if _same(str(r.get("dispatcher_serial") or ""), orphan)]  # fmt: skip
    if naming:
        d.registry.update_many(naming, serial_status="current", dispatcher_serial=installed,
                               serial_confirmed=format_iso(now))  # fmt: skip
    state = rs.load(cfg.rotation_file)
    if state is None or _same(state.current_serial, orphan):
        extra = dict(state.extra) if state is not None else {}
        extra["orphan_retired"] = orphan
        back = RotationState(installed, None, format_iso(now), format_iso(now), 0,
                             previous_retired=format_iso(now), extra=extra)  # fmt: skip
        rs.save(back, cfg.rotation_file, d.writer)
    nxt = _Paths.of(d, ".next")
    if _same(_serial_of(nxt.cert), orphan):
        d.writer.delete(nxt.cert)
        d.writer.delete(nxt.key)
    prev = _Paths.of(d, ".prev")
    if _same(_serial_of(prev.cert), installed):
        d.writer.delete(prev.key)
        d.writer.delete(prev.cert)
    return {"serial": orphan, "removed": removed, "failed": failed}


def _prev_any_ctx(d: Dispatcher, orphan: str) -> ssl.SSLContext | None:
    """The kept ``.prev`` credentials, unless they present ``orphan``."""
    cert, key = prev_paths(d)
    serial = _serial_of(cert)
    if serial is None or _same(serial, orphan):
        return None
    return _ctx(d, cert, key)


async def broadcast(
    d: Dispatcher, now: float | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Retry the ``add`` for agents still pending/unknown; ``{serial, updated, failed}``.

    Uses the kept previous credentials first (what those agents still trust), then the
    installed ones. Without any rotation state the installed serial is broadcast.
    """
    now = time.time() if now is None else now
    state = rs.load(d.cfg.rotation_file)
    if state is not None and state.unfinished:  # a rotation interrupted before its install
        if has_material(d, state):
            return await finish(d, state, now, pause=False)
        orphan = await retire_orphan(d, state.current_serial, now)
        return {"serial": installed_serial(d), "updated": [], "failed": orphan["failed"],
                "orphan_retired": orphan}  # fmt: skip
    _recover_install(d, state)
    if state is None or not state.current_serial:
        serial = installed_serial(d)
        if serial is None:
            return {"serial": None, "updated": [], "failed": []}
        state = RotationState(serial, None, format_iso(now), format_iso(now), 0)
    return await _broadcast(d, state, now, timeout=timeout)


async def retire(d: Dispatcher, now: float | None = None, force: bool = False) -> dict[str, Any]:
    """Remove the previous serial from every ``current`` agent, with the new cert.

    Runs once the overlap is over, early once every registered agent acknowledged the new
    serial, or at once with ``force``. After an early retirement in which some agent
    could not be told, the state keeps ``previous_serial`` so the next call retries.
    """
    now = time.time() if now is None else now
    cfg = d.cfg
    state = rs.load(cfg.rotation_file)
    if state is None or not state.previous_serial:
        return {"retired": False, "reason": "no previous serial to retire"}
    if state.unfinished:
        return {"retired": False, "reason": "rotation not finished yet"}
    records = d.registry.all()
    reason = retirement_reason(state, records, now, force)
    if reason is None:
        waiting = [str(r.get("hostname")) for r in records
                   if not acknowledged(r, state.current_serial)]  # fmt: skip
        return {"retired": False, "reason": "overlap running", "waiting": waiting,
                "overlap_expires": state.overlap_expires}  # fmt: skip
    if reason == "all-acknowledged" and d.retire_blocker is not None:
        blocked = d.retire_blocker(state.current_serial)
        if blocked:  # a cluster member still presents the previous serial
            return {"retired": False, "reason": "cluster members not converged",
                    "detail": blocked}  # fmt: skip
    _recover_install(d, state)
    if not _same(installed_serial(d), state.current_serial):
        error = (f"installed certificate {cfg.cert} does not present the current serial "
                 f"{state.current_serial}; refusing to retire {state.previous_serial}")  # fmt: skip
        ev("serial-retire-error", logging.ERROR, error=error)
        return {"retired": False, "reason": reason, "error": error}
    old = state.previous_serial
    current = [str(r["hostname"]) for r in records
               if r.get("serial_status") == "current" and r.get("hostname")]  # fmt: skip
    failed: list[dict[str, str]] = []
    if current:
        ev("serial-retire", hosts=",".join(current), serial=old, reason=reason)
        ctx = _current_ctx(d, state.current_serial)
        outcome = await _send_serial(d, _targets(d, current), old, "remove",
                                     [ctx] if ctx is not None else [])  # fmt: skip
        failed = [{"host": n, "error": e} for n, e in outcome.items() if e]
        for f in failed:
            ev("serial-retire-error", logging.WARNING, agent=f["host"], error=f["error"])
    removed = [n for n in current if n not in {f["host"] for f in failed}]
    if failed and reason == "all-acknowledged":
        return {"retired": False, "reason": reason, "serial": old, "removed": removed,
                "failed": failed}  # fmt: skip
    rs.save(state.retired(now), cfg.rotation_file, d.writer)
    prev = _Paths.of(d, ".prev")
    d.writer.delete(prev.key)
    d.writer.delete(prev.cert)
    return {"retired": True, "reason": reason, "serial": old, "removed": removed,
            "failed": failed}  # fmt: skip


def expire_stale(d: Dispatcher, now: float | None = None) -> list[str]:
    """Mark agents still ``pending`` after the overlap ``stale``; their names."""
    state = rs.load(d.cfg.rotation_file)
    stale = stale_candidates(state, d.registry.all(), now)
    if stale:
        d.registry.update_many(stale, serial_status="stale")
    for name in stale:
        ev("serial-stale", logging.WARNING, agent=name,
           reason="overlap window expired without confirmation")  # fmt: skip
    return stale


def cert_not_after(path: str | Path) -> float:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return cert.not_valid_after_utc.timestamp()


async def check_and_rotate(d: Dispatcher, now: float | None = None) -> dict[str, Any] | None:
    """Rotate when ``days_left <= cert_renewal_days``; the rotate() report, else None."""
    now = time.time() if now is None else now
    cfg = d.cfg
    try:
        left = days_left(cert_not_after(cfg.cert), now)
    except (OSError, ValueError) as exc:
        ev("cert-check-warn", logging.WARNING, error=f"cannot read {cfg.cert}: {exc}")
        return None
    ev("cert-check", days_left=left, threshold=cfg.cert_renewal_days)
    if not rotation_due(left, cfg.cert_renewal_days):
        return None
    state = rs.load(cfg.rotation_file)
    if state is not None and state.previous_serial and not state.overlap_over(now):
        ev("cert-check-warn", logging.WARNING, days_left=left,
           error="rotation due but the previous rotation's overlap is still running")  # fmt: skip
        return None
    ev("cert-renewal-start", days_left=left)
    return await rotate(d, now)


def serial_status(d: Dispatcher) -> dict[str, Any]:
    """rotation.json and each agent's rotation fields (for ``ced serial-status``)."""
    state = rs.load(d.cfg.rotation_file)
    agents = [
        {k: r.get(k, "") for k in
         ("hostname", "serial_status", "serial_confirmed", "dispatcher_serial")}
        for r in d.registry.all()
    ]  # fmt: skip
    return {"state": state.to_json() if state is not None else None, "agents": agents}


async def maintain(d: Dispatcher, now: float | None = None) -> dict[str, Any]:
    """Upstream's ``maintain`` phases, each isolated, plus retirement.

    ping (with agent cert renewal) -> check_and_rotate -> broadcast -> expire_stale ->
    retire -> run-store purge. A failing phase is logged and recorded under ``errors``.
    """
    from dispatcher.client import fanout
    from dispatcher.pki.renewal import maybe_renew, pin_contacts
    from dispatcher.reqid import new_reqid

    out: dict[str, Any] = {"ok": 1, "agents": 0, "pinged": 0, "errors": {}}

    def failed(phase: str, action: str, exc: Exception) -> None:
        ev(action, logging.WARNING, phase=phase, error=f"{exc.__class__.__name__}: {exc}")
        out["errors"][phase] = str(exc)

    try:
        targets = _targets(d, d.registry.names())
        out["agents"] = len(targets)
        reach = fanout.Reach(d.client_ctx(), d.cfg.read_timeout, d.cfg.max_parallel,
                             max(d.cfg.max_hosts, len(targets)), observed={})  # fmt: skip
        results = await fanout.ping_all(targets, new_reqid(), reach)
        out["pinged"] = sum(1 for r in results if r.get("status") == "ok")
        ok = {str(r.get("host")) for r in results if r.get("status") == "ok"}
        out["pinned"] = pin_contacts(d, reach.observed or {}, ok)
        renewed: list[str] = []
        by_name = {t.name: t for t in targets}
        for res in results:
            t = by_name.get(str(res.get("host")))
            if t is not None and res.get("status") == "ok" and await maybe_renew(d, t, res, now):
                renewed.append(t.name)
        out["renewed"] = renewed
    except Exception as exc:
        failed("ping", "maintain-error", exc)
    try:
        out["rotation"] = await check_and_rotate(d, now)
    except Exception as exc:
        failed("check_and_rotate", "cert-check-error", exc)
    try:
        out["broadcast"] = await broadcast(d, now)
    except Exception as exc:
        failed("broadcast", "broadcast-error", exc)
    try:
        out["stale"] = expire_stale(d, now)
    except Exception as exc:
        failed("expire_stale", "expire-stale-error", exc)
    try:
        out["retire"] = await retire(d, now)
    except Exception as exc:
        failed("retire", "serial-retire-loop-error", exc)
    try:
        out["purged"] = d.runstore.purge()
    except Exception as exc:
        failed("purge", "maintain-error", exc)
    ev("maintain", agents=out["agents"], pinged=out["pinged"], errors=len(out["errors"]))
    return out
