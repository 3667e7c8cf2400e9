"""The pairing queue in ``<pairing_dir>`` (spec 5.2 step 7, 5.3).

Files, all written atomically (temp + rename, 0644):

* ``<reqid>.json``     a pending request, written by the pairing listener;
* ``<reqid>.approved`` the approval (cert, CA, echoed nonce, dispatcher serial and id);
* ``<reqid>.denied``   the denial.

Any process on the same directory may approve or deny; the listener that holds the
agent's connection polls for the decision and delivers it verbatim. Approval and denial
are leader-only effects: every decision file and registry write goes through a
:class:`~dispatcher.statewrite.StateWriter`.

Beyond upstream, :func:`submit` refuses, before anything is written (trust boundaries:
one host must not be able to fill the queue or pass for another):

* a name that is not an RFC 1123 host name (:func:`valid_agent_name`: dot-separated
  labels of letters, digits and inner hyphens, 1..63 each, 253 in all, last label not all
  digits so no IPv4 literal passes for a name; no ``_``, no trailing dot), and a CSR that
  fails upstream's checks or whose CN is not exactly the requested name
  (``invalid hostname`` / ``invalid CSR: ...``);
* more than ``max_per_source`` pending requests from one client address
  (``pairing_max_per_source``, default 3; ``too many pending requests from this address``);
* a CSR, or another CSR for the same public key, that is already pending, or whose public
  key was submitted before (remembered ``SEEN_KEYS_FOR`` seconds in ``.seen-keys``),
  and a CSR whose code equals a pending request's code. The code stays upstream's
  (SHA-256 of the CSR PEM, spec 5.5) because an upstream agent prints the code it computes
  itself: the same CSR always has the same code, so refusing to queue it twice is what
  keeps a code from ever being shown for two requests. Every agent makes a new key for
  each ``request-pairing``, so an honest agent never hits this.

A request sent again on a new connection (our agent reconnects when its connection
drops, with the same CSR and nonce) is the same request, recognised by its CSR and nonce:
:func:`submit` returns it marked ``resumed`` instead of refusing it as a duplicate:
``"pending"`` while it waits in this queue, ``"approved"`` once approved (the record then
carries the ``approval`` to deliver). A pending request is resumed only from the address
that sent it; the same key with another nonce, or from another address, is still refused.
A request withdrawn undecided because its connection was gone (:func:`withdraw`) may be
queued again, once, by that very request (same CSR, nonce and address): the agent was
still asking, nobody had decided, and refusing it as a reused key would fail an honest
agent whose connection dropped at the wrong moment.

Approvals survive the leader: :func:`approve` also writes the approval document to
``<ca_dir>/pairing-approved/<key sha256>.json`` (before ``<reqid>.approved``), a file the
cluster's generations carry, so the approve action is acknowledged (``sync_ack``) only
once members hold it, and a new leader answers the agent's resubmission with the
certificate. These documents hold public material only (certificate, CA certificate,
nonce) and are pruned after ``APPROVED_KEEP`` seconds. Pending requests and denials stay
the leader's own: after a failover, a waiting agent's resubmission is a new request.

Deviation from upstream (on purpose): :func:`approve` registers the agent *before* it
writes ``<reqid>.approved``. If the registry write fails, no certificate has left the
dispatcher; upstream's order can hand out a certificate for an agent that is then
missing from the registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.certinfo import identity_der
from agent.common.certs import pairing_code
from agent.common.errors import CtrlExecError
from agent.common.logfmt import event
from agent.common.wire import dumps
from dispatcher.config import DispatcherConfig
from dispatcher.errors import LeaderOnlyRefused
from dispatcher.pki import ca as pki
from dispatcher.registry import Registry, RegistryError
from dispatcher.statewrite import StateWriter, batched, default_writer

STALE_AFTER = 600.0
DEFAULT_AGENT_PORT = 7443
NEW_REQID_RE = re.compile(r"^[a-f0-9]{16}$")
REQID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
AGENT_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
SCOPE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
LOOKUP_BY = ("ip", "hostname")
FILE_MODE = 0o644
LOCK_NAME = ".queue.lock"
SEEN_KEYS = ".seen-keys"  # JSON {sha256: time}; not *.json, which are requests
SEEN_KEYS_FOR = 30 * 86400.0
SEEN_KEYS_MAX = 5_000
# JSON {key sha256: {"request": fingerprint, "t": time}}: requests withdrawn because their
# agent was gone before a decision; only that very request may come back (:func:`withdraw`)
WITHDRAWN = ".withdrawn"
DEFAULT_MAX_PER_SOURCE = 3
APPROVED_DIR = "pairing-approved"  # under ca_dir: carried by the cluster's generations
APPROVED_KEEP = 86400.0
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class PairingQueueError(CtrlExecError):
    """A queue operation failed; the message is fit for an operator."""


class QueueFull(PairingQueueError):
    def __init__(self) -> None:
        super().__init__("pairing queue full")


class Refused(PairingQueueError):
    """A request refused before it was queued: ``reason`` goes on the wire (HTTP 200,
    ``{"status":"error","reason":...}``), ``log_reason`` into ``pair-reject``."""

    def __init__(self, reason: str, log_reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_reason = log_reason


class NoSuchRequest(PairingQueueError):
    def __init__(self, reqid: str) -> None:
        super().__init__(f"No pending request '{reqid}'")
        self.reqid = reqid


@dataclass
class ApprovalResult:
    reqid: str
    name: str
    lookup_by: str
    ip: str
    port: int
    cert: str
    expiry: str
    dispatcher_serial: str
    dispatcher_id: str
    record: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def addr(self) -> str:
        """The address dispatch will connect to (``lookup_by`` decides which)."""
        return self.ip if self.lookup_by == "ip" else self.name


# ----- helpers -------------------------------------------------------------------------


def new_reqid() -> str:
    """16 lowercase hex characters from 8 random bytes (spec 10.1)."""
    return secrets.token_hex(8)


def valid_reqid(reqid: str) -> bool:
    return bool(REQID_RE.match(reqid)) and len(reqid) <= 64


def valid_hostname(name: str) -> bool:
    """Upstream's name check (what a queued or registered name may look like)."""
    return bool(HOSTNAME_RE.match(name)) and len(name) <= 253


def valid_agent_name(name: object) -> bool:
    """What a new pairing request may ask for: an RFC 1123 host name, 253 at most, whose
    last label is not all digits (no IPv4 literal), no trailing dot."""
    return (
        isinstance(name, str)
        and len(name) <= 253
        and AGENT_NAME_RE.fullmatch(name) is not None
        and not name.rsplit(".", 1)[-1].isdigit()
    )


def valid_ip(value: object) -> bool:
    if not isinstance(value, str) or not value:
        return False
    addr, sep, scope = value.partition("%")
    if sep and not SCOPE_ID_RE.fullmatch(scope):
        return False
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        return False
    return True


def csr_facts(csr: str, hostname: str) -> tuple[str, str]:
    """``(CN, SHA-256 of the public key)`` of a CSR that passes upstream's checks and whose
    CN is ``hostname``; :class:`Refused` otherwise."""
    try:
        parsed = pki.validate_csr(csr)
    except pki.PKIError as exc:
        raise Refused(f"invalid CSR: {exc}", "invalid-csr") from None
    cn = pki.csr_common_name(parsed)
    if cn != hostname:
        raise Refused("invalid CSR: its common name is not the requested hostname",
                      "csr-cn-mismatch")  # fmt: skip
    return cn, pki.public_key_sha256(parsed.public_key())


def key_of(record: dict[str, Any]) -> str:
    """The public-key hash of a queued record (computed for records written without it)."""
    known = record.get("key_sha256")
    if isinstance(known, str) and known:
        return known
    try:
        parsed = pki.validate_csr(str(record.get("csr", "")))
    except pki.PKIError:
        return ""
    return pki.public_key_sha256(parsed.public_key())


def valid_port(value: object) -> int | None:
    """The port as an int when it is 1..65535 (int or digit string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and 1 <= value <= 65535:
        return value
    return None


def iso_now(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))


def _dir(pairing_dir: str | Path) -> Path:
    d = Path(pairing_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o770)
    return d


def _check(reqid: str) -> str:
    if not isinstance(reqid, str) or not valid_reqid(reqid):
        raise PairingQueueError(f"invalid request id '{reqid}'")
    return reqid


def paths(pairing_dir: str | Path, reqid: str) -> tuple[Path, Path, Path]:
    """``(<reqid>.json, <reqid>.approved, <reqid>.denied)``."""
    d = Path(pairing_dir)
    _check(reqid)
    return d / f"{reqid}.json", d / f"{reqid}.approved", d / f"{reqid}.denied"


@contextlib.contextmanager
def _locked(pairing_dir: str | Path) -> Iterator[None]:
    """Serialise queue changes between processes (submit, approve, deny)."""
    d = _dir(pairing_dir)
    fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def approvals_dir(cfg: DispatcherConfig) -> Path:
    """Where approvals are kept for agents that reconnect (replicated with ``ca_dir``)."""
    return Path(cfg.ca_dir) / APPROVED_DIR


def approval_path(approvals: str | Path, key: str) -> Path | None:
    """``<approvals>/<key>.json`` for a public-key sha256 (None for anything else)."""
    return Path(approvals) / f"{key}.json" if _SHA256_RE.fullmatch(key) else None


def _csr_sha256(csr: str) -> str:
    return hashlib.sha256(csr.encode()).hexdigest()


def _same_request(stored_csr: object, stored_nonce: object, csr: str, nonce: object) -> bool:
    """A resubmission of one request: the same CSR and the same (non-empty) nonce."""
    return (isinstance(nonce, str) and bool(nonce) and stored_nonce == nonce
            and stored_csr == csr)  # fmt: skip


def resumed_approval(approvals: str | Path, key: str, csr: str, nonce: object
                     ) -> dict[str, Any] | None:  # fmt: skip
    """The kept approval of this very request (same key, CSR and nonce), else None;
    :class:`Refused` when the key was approved for another request."""
    path = approval_path(approvals, key)
    doc = _read_json(path) if path is not None else None
    if doc is None:
        return None
    approval, request = doc.get("approval"), doc.get("request")
    if not isinstance(approval, dict) or not isinstance(request, dict):
        return None
    if not _same_request(doc.get("csr_sha256"), approval.get("nonce"), _csr_sha256(csr), nonce):
        raise Refused("duplicate request: this key was submitted before - run "
                      "request-pairing again for a new key", "reused-key")  # fmt: skip
    return {**request, "resumed": "approved", "approval": approval}


def _prune_approvals(approvals: Path, writer: StateWriter, now: float) -> None:
    if not approvals.is_dir():
        return
    for p in sorted(approvals.glob("*.json")):
        try:
            old = now - p.stat().st_mtime > APPROVED_KEEP
        except FileNotFoundError:
            continue
        if old:
            writer.delete(p)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


# ----- queue ---------------------------------------------------------------------------


def _undecided(pairing_dir: str | Path, reqid: str) -> dict[str, Any]:
    """The queued request, if it has no decision yet (call under :func:`_locked`)."""
    qpath, apath, dpath = paths(pairing_dir, reqid)
    rec = _read_json(qpath)
    if rec is None:
        raise NoSuchRequest(reqid)
    if apath.exists() or dpath.exists():
        raise PairingQueueError(f"Request '{reqid}' has already been decided")
    return rec


def expire_stale(
    pairing_dir: str | Path,
    max_age: float = STALE_AFTER,
    now: float | None = None,
    writer: StateWriter | None = None,
) -> list[str]:
    """Delete ``*.json`` older than ``max_age`` (mtime) with no decision; returns reqids."""
    d = Path(pairing_dir)
    if not d.is_dir():
        return []
    w = writer or default_writer()
    t = time.time() if now is None else now
    gone = []
    for p in sorted(d.glob("*.json")):
        reqid = p.stem
        if (d / f"{reqid}.approved").exists() or (d / f"{reqid}.denied").exists():
            continue
        try:
            age = t - p.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > max_age and w.delete(p):
            gone.append(reqid)
    return gone


def count(pairing_dir: str | Path) -> int:
    d = Path(pairing_dir)
    return len(list(d.glob("*.json"))) if d.is_dir() else 0


def _seen_keys(pairing_dir: str | Path, now: float) -> dict[str, float]:
    """Public keys submitted in the last ``SEEN_KEYS_FOR`` seconds: ``{sha256: time}``."""
    obj = _read_json(Path(pairing_dir) / SEEN_KEYS) or {}
    keys = {k: float(v) for k, v in obj.items() if isinstance(v, int | float)}
    return {k: t for k, t in keys.items() if now - t < SEEN_KEYS_FOR}


def _refuse_duplicates(
    pairing_dir: str | Path, *, source_ip: str, csr: str, key: str, code: str,
    max_per_source: int, now: float, was_withdrawn: bool,
) -> dict[str, float]:  # fmt: skip
    """Raise :class:`Refused` for a request that must not be queued (call under the
    lock); returns the seen-keys table to extend."""
    pending = list_pending(pairing_dir, expire=False)
    if max_per_source > 0 and sum(r.get("source_ip") == source_ip for r in pending) >= (
        max_per_source
    ):
        raise Refused("too many pending requests from this address", "source-limit")
    for rec in pending:
        if rec.get("csr") == csr or key_of(rec) == key:
            raise Refused("duplicate request: this key is already waiting for approval",
                          "duplicate-key")  # fmt: skip
    seen = _seen_keys(pairing_dir, now)
    if key in seen and not was_withdrawn:
        raise Refused("duplicate request: this key was submitted before - run "
                      "request-pairing again for a new key", "reused-key")  # fmt: skip
    if any(str(rec.get("code", "")) == code for rec in pending):
        raise Refused("pairing code collides with a pending request - run request-pairing "
                      "again for a new key", "code-collision")  # fmt: skip
    return seen


def submit(
    pairing_dir: str | Path,
    *,
    hostname: str,
    csr: str,
    nonce: Any,
    source_ip: str,
    ip: str | None = None,
    lookup_by: str | None = None,
    port: int | None = None,
    reverse_dns: str = "",
    reverse_confirmed: bool = False,
    max_queue: int = 10,
    max_per_source: int = DEFAULT_MAX_PER_SOURCE,
    reqid: str | None = None,
    writer: StateWriter | None = None,
    now: float | None = None,
    approvals: str | Path | None = None,
) -> dict[str, Any]:
    """Queue one request; returns the record written. Raises :class:`QueueFull` or
    :class:`Refused` (nothing is written then).

    A resubmission (same CSR and nonce) writes nothing and returns the request marked
    ``resumed``: ``"approved"`` (with the ``approval``, found in ``approvals``, the kept
    approvals dir) or ``"pending"`` (the queued record).

    ``source_ip`` is the client's real address (the per-source cap counts it); ``ip`` is
    the agent-reported address (used when it is a valid literal, else the source address);
    ``lookup_by`` and ``port`` are the agent's hints (None when absent or invalid).
    ``max_per_source`` 0 means no per-source cap.
    """
    if not isinstance(hostname, str) or not valid_agent_name(hostname):
        raise Refused("invalid hostname", "invalid-hostname")
    if not isinstance(csr, str):
        raise Refused("invalid CSR: not a string", "invalid-csr")
    cn, key = csr_facts(csr, hostname)
    if approvals is not None:
        resumed = resumed_approval(approvals, key, csr, nonce)
        if resumed is not None:
            return resumed
    rid = _check(reqid or new_reqid())
    w = writer or default_writer()
    t = time.time() if now is None else now
    code = pairing_code(csr)
    record = {
        "id": rid,
        "hostname": hostname,
        "ip": ip if ip and valid_ip(ip) else source_ip,
        "source_ip": source_ip,
        "csr": csr,
        "nonce": nonce,
        "lookup_by": lookup_by if lookup_by in LOOKUP_BY else None,
        "port": valid_port(port),
        "received": iso_now(t),
        "code": code,
        "reverse_dns": reverse_dns or "",
        "reverse_confirmed": 1 if reverse_confirmed else 0,
        "csr_cn": cn,
        "key_sha256": key,
    }
    with _locked(pairing_dir):
        expire_stale(pairing_dir, writer=w)
        for rec in list_pending(pairing_dir, expire=False):
            if (_same_request(rec.get("csr"), rec.get("nonce"), csr, nonce)
                    and rec.get("source_ip") == source_ip):  # fmt: skip
                return {**rec, "resumed": "pending"}
        if count(pairing_dir) >= max_queue:
            raise QueueFull()
        withdrawn = _withdrawn(pairing_dir, t)
        back = withdrawn.get(key, {}).get("request")
        was_withdrawn = back is not None and back == _fingerprint(csr, nonce, source_ip)
        seen = _refuse_duplicates(pairing_dir, source_ip=source_ip, csr=csr, key=key,
                                  code=code, max_per_source=max_per_source, now=t,
                                  was_withdrawn=was_withdrawn)  # fmt: skip
        qpath = paths(pairing_dir, rid)[0]
        if qpath.exists():
            raise PairingQueueError(f"request '{rid}' already queued")
        seen[key] = t
        if len(seen) > SEEN_KEYS_MAX:
            seen = dict(sorted(seen.items(), key=lambda kv: kv[1])[-SEEN_KEYS_MAX:])
        with batched(w):  # one fenced transaction
            w.write(Path(pairing_dir) / SEEN_KEYS, dumps(seen), 0o640)
            if key in withdrawn:  # queued again: its way back is used up
                del withdrawn[key]
                w.write(Path(pairing_dir) / WITHDRAWN, dumps(withdrawn), 0o640)
            w.write(qpath, dumps(record), FILE_MODE)
    return record


def withdraw(
    pairing_dir: str | Path, reqid: str, writer: StateWriter | None = None,
    now: float | None = None,
) -> bool:  # fmt: skip
    """Drop a request whose agent is gone (its files, decided or not); returns whether it
    had been decided. An undecided request with a nonce is remembered in ``.withdrawn``,
    so that very request (same CSR, nonce and address) may be queued again by
    :func:`submit`; any other use of its key stays refused."""
    w = writer or default_writer()
    t = time.time() if now is None else now
    qpath, apath, dpath = paths(pairing_dir, reqid)
    with _locked(pairing_dir):
        rec = _read_json(qpath)
        decided = apath.exists() or dpath.exists()
        key = fp = None
        if rec is not None and not decided:
            key = key_of(rec)
            fp = _fingerprint(str(rec.get("csr", "")), rec.get("nonce"),
                              str(rec.get("source_ip", "")))  # fmt: skip
        with batched(w):
            if key and fp is not None:
                withdrawn = _withdrawn(pairing_dir, t)
                withdrawn[key] = {"request": fp, "t": t}
                if len(withdrawn) > SEEN_KEYS_MAX:
                    withdrawn = dict(sorted(withdrawn.items(),
                                            key=lambda kv: kv[1]["t"])[-SEEN_KEYS_MAX:])  # fmt: skip
                w.write(Path(pairing_dir) / WITHDRAWN, dumps(withdrawn), 0o640)
            for p in (qpath, apath, dpath):
                w.delete(p)
    return decided


def _fingerprint(csr: str, nonce: object, source_ip: str) -> str | None:
    """One request's identity: its CSR, nonce and client address (None without a nonce:
    such a request cannot be told from a replay)."""
    if not isinstance(nonce, str) or not nonce:
        return None
    return hashlib.sha256(json.dumps([csr, nonce, source_ip]).encode()).hexdigest()


def _withdrawn(pairing_dir: str | Path, now: float) -> dict[str, dict[str, Any]]:
    obj = _read_json(Path(pairing_dir) / WITHDRAWN) or {}
    out: dict[str, dict[str, Any]] = {}
    for k, v in obj.items():
        if (isinstance(v, dict) and isinstance(v.get("request"), str)
                and isinstance(v.get("t"), int | float) and now - v["t"] < SEEN_KEYS_FOR):  # fmt: skip
            out[k] = v
    return out


def get_request(pairing_dir: str | Path, reqid: str) -> dict[str, Any] | None:
    return _read_json(paths(pairing_dir, reqid)[0])


def list_pending(
    pairing_dir: str | Path, writer: StateWriter | None = None, *, expire: bool = True
) -> list[dict[str, Any]]:
    """Undecided requests, oldest first; stale ones are expired first (``expire``)."""
    d = Path(pairing_dir)
    if not d.is_dir():
        return []
    if expire:
        expire_stale(d, writer=writer)
    out = []
    for p in d.glob("*.json"):
        rid = p.stem
        if not valid_reqid(rid):
            continue
        if (d / f"{rid}.approved").exists() or (d / f"{rid}.denied").exists():
            continue
        rec = _read_json(p)
        if rec is not None:
            out.append(rec)
    out.sort(key=lambda r: (str(r.get("received", "")), str(r.get("id", ""))))
    return out


def describe(records: list[dict[str, Any]], registry: Registry) -> list[dict[str, Any]]:
    """``records`` plus what an operator needs to judge each (``list-requests``, prompts):

    ``csr_cn`` (the name the certificate will carry), ``approve_ip`` (the address approval
    registers unless ``--ip`` says otherwise), ``source_ip`` (the real client address),
    ``registered`` (the name is already in the registry), ``registered_ip`` (its address
    there, or None) and ``ip_registered_to`` (other agents registered with ``approve_ip``).
    """
    by_ip: dict[str, list[str]] = {}
    if records:
        for r in registry.all():
            by_ip.setdefault(str(r.get("ip", "")), []).append(str(r.get("hostname", "")))
    out = []
    for record in records:
        rec = dict(record)
        if not rec.get("csr_cn"):
            try:
                rec["csr_cn"] = pki.csr_common_name(pki.validate_csr(str(rec.get("csr", ""))))
            except pki.PKIError:
                rec["csr_cn"] = ""
        name = str(record.get("hostname", ""))
        approve_ip = str(record.get("ip") or record.get("source_ip") or "")
        rec["approve_ip"] = approve_ip
        rec["source_ip"] = str(record.get("source_ip", ""))
        existing = registry.get(name) if valid_hostname(name) else None
        rec["registered"] = existing is not None
        rec["registered_ip"] = str(existing.get("ip", "")) if existing is not None else None
        rec["ip_registered_to"] = sorted(n for n in by_ip.get(approve_ip, []) if n != name)
        out.append(rec)
    return out


def outcome(pairing_dir: str | Path, reqid: str) -> tuple[str, bytes] | None:
    """The decision for ``reqid`` as ``("approved"|"denied", raw file bytes)``, or None."""
    _, approved, denied = paths(pairing_dir, reqid)
    for status, p in (("approved", approved), ("denied", denied)):
        try:
            return status, p.read_bytes()
        except FileNotFoundError:
            continue
    return None


# ----- decisions -----------------------------------------------------------------------


def _dispatcher_serial(cfg: DispatcherConfig, warnings: list[str]) -> str:
    try:
        serial = pki.cert_serial_hex(cfg.cert)
    except (OSError, ValueError) as exc:
        serial = ""
        warnings.append(f"cannot read the dispatcher serial from {cfg.cert}: {exc}")
    if not serial:
        warnings.append(
            "WARNING: dispatcher serial is EMPTY - the agent will not trust this dispatcher "
            "(run setup-ctrl-exec, then re-pair)"
        )
    return serial


def approve(
    cfg: DispatcherConfig,
    reqid: str,
    lookup_by: str | None = None,
    ip: str | None = None,
    agent_port: int | None = None,
    writer: StateWriter | None = None,
    tags: dict[str, str] | None = None,
) -> ApprovalResult:
    """Sign the queued CSR, register the agent and write ``<reqid>.approved`` (spec 5.3).

    Effective values: ``lookup_by`` operator > agent hint > ``hostname``; port operator >
    reported > 7443; ip operator > queued ip. ``tags`` (a pairing token's) go into the
    registry record.
    """
    if lookup_by is not None and lookup_by not in LOOKUP_BY:
        raise PairingQueueError(f"--lookup-by must be ip or hostname, got '{lookup_by}'")
    if ip is not None and not valid_ip(ip):
        raise PairingQueueError(f"--ip '{ip}' is not an IP address")
    if agent_port is not None and valid_port(agent_port) is None:
        raise PairingQueueError(f"--agent-port must be 1..65535, got '{agent_port}'")
    w = writer or default_writer()
    d = cfg.pairing_dir
    _, apath, _ = paths(d, _check(reqid))
    with _locked(d):
        rec = _undecided(d, reqid)
        name = str(rec.get("hostname", ""))
        if not valid_hostname(name):
            raise PairingQueueError(f"request '{reqid}' has an invalid hostname")
        eff_lookup = lookup_by or (rec.get("lookup_by") if rec.get("lookup_by") in LOOKUP_BY
                                   else None) or "hostname"  # fmt: skip
        eff_port = valid_port(agent_port) or valid_port(rec.get("port")) or DEFAULT_AGENT_PORT
        eff_ip = ip or str(rec.get("ip") or rec.get("source_ip") or "")
        try:
            ca = pki.load_ca(cfg.ca_dir, cfg.ca or None)
            cert = pki.sign_csr(ca, str(rec.get("csr", "")), days=825)
        except pki.PKIError as exc:
            raise PairingQueueError(f"cannot sign request '{reqid}': {exc}") from None
        warnings: list[str] = []
        serial = _dispatcher_serial(cfg, warnings)
        expiry = pki.cert_not_after(cert)
        cert_serial, pubkey = identity_der(ssl.PEM_cert_to_DER_cert(cert))  # the pins
        approval = {
            "status": "approved",
            "cert": cert,
            "ca": ca.pem,
            "nonce": rec.get("nonce", ""),
            "dispatcher_serial": serial,
            "dispatcher_id": cfg.dispatcher_id,
        }
        registry = Registry(cfg.registry_dir, w)
        # one fenced transaction for the three writes, under the queue and registry locks
        try:
            with registry.locked(), batched(w):
                record = registry.register(
                    name, ip=eff_ip, port=eff_port, lookup_by=eff_lookup, reqid=reqid,
                    expiry=expiry, dispatcher_serial=serial, cert_serial=cert_serial,
                    pubkey_sha256=pubkey, tags=tags,
                )  # fmt: skip
                _keep_approval(cfg, w, rec, approval)
                w.write(apath, dumps(approval), FILE_MODE)
        except (RegistryError, LeaderOnlyRefused) as exc:  # nothing written at all
            raise PairingQueueError(f"cannot register '{name}': {exc}") from None
    for msg in warnings:
        event("pair-warn", logging.WARNING, reqid=reqid, reason=msg)
    event("pair-approve", agent=name, ip=eff_ip, lookup_by=eff_lookup, port=eff_port,
          reqid=reqid, serial=serial)  # fmt: skip
    return ApprovalResult(reqid, name, eff_lookup, eff_ip, eff_port, cert, expiry, serial,
                          cfg.dispatcher_id, record, warnings)  # fmt: skip


def _keep_approval(cfg: DispatcherConfig, w: StateWriter, rec: dict[str, Any],
                   approval: dict[str, Any]) -> None:  # fmt: skip
    """Keep the approval where every member gets it (see the module docstring)."""
    path = approval_path(approvals_dir(cfg), key_of(rec))
    if path is None:
        return
    now = time.time()
    _prune_approvals(path.parent, w, now)
    request = {k: rec.get(k) for k in ("id", "hostname", "ip", "source_ip", "code")}
    doc = {"request": request, "csr_sha256": _csr_sha256(str(rec.get("csr", ""))),
           "approved": iso_now(now), "approval": approval}  # fmt: skip
    w.write(path, dumps(doc), 0o640)


def deny(
    cfg: DispatcherConfig,
    reqid: str,
    writer: StateWriter | None = None,
    reason: str = "rejected by operator",
) -> None:
    """Write ``<reqid>.denied`` and delete the request (spec 5.3)."""
    w = writer or default_writer()
    d = cfg.pairing_dir
    qpath, _, dpath = paths(d, _check(reqid))
    with _locked(d):
        rec = _undecided(d, reqid)
        with batched(w):  # one fenced transaction for both
            w.write(dpath, dumps({"status": "denied", "reason": reason}), FILE_MODE)
            w.delete(qpath)
    event("pair-deny", agent=rec.get("hostname", ""), ip=rec.get("ip", ""), reqid=reqid)
