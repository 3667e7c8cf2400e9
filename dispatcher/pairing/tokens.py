"""Pairing tokens: bulk approval of pairing requests (``ced pairing-token``).

A token is ``cet1.<id>.<secret>``: ``id`` is 10 lowercase hex characters (what logs and
``ced pairing-token list`` name), ``secret`` 32 random bytes (``secrets.token_urlsafe``).
``ced pairing-token create`` makes the tokens on the operator's host and sends the leader
only their SHA-256 (the action's arguments and result travel through etcd, sealed but not
encrypted), so a token in clear exists only in ``ced``'s output and on the agent.

The store is ``<ca_dir>/pairing-tokens.json`` (0640), written atomically through the
:class:`~dispatcher.statewrite.StateWriter` (fenced in a cluster, carried by the
generations with the CA files, so a new leader knows every token and every use):

``{"version": 1, "tokens": {id: {"sha256", "created", "expires", "tags", "used",
"revoked"}}}``

Each token approves one pairing request, once, before it expires: :func:`claim` checks
the presented token (format, known id, hash compared in constant time, not revoked, not
expired, not used) and marks it used by that request under an exclusive lock, in one
write. Two agents presenting one token: exactly one claim succeeds; the other request is
queued as a request without a token (pending, for an operator's decision, under the
per-source caps). Nothing about the token is on the wire back to the agent.

A claim whose request cannot then be queued (refused, queue error) is :func:`release`\\ d:
the token is unused again. Used, revoked and expired tokens are kept ``KEEP`` seconds
after they ended (for ``list`` and the logs), then pruned.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.errors import CtrlExecError
from agent.common.wire import dumps
from dispatcher.statewrite import StateWriter, default_writer

STORE = "pairing-tokens.json"  # under ca_dir: replicated with the CA files
LOCK = ".pairing-tokens.lock"
PREFIX = "cet1"
ID_RE = re.compile(r"[0-9a-f]{10}")
HASH_RE = re.compile(r"[0-9a-f]{64}")
TOKEN_RE = re.compile(r"cet1\.([0-9a-f]{10})\.([A-Za-z0-9_-]{43})")
TAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TAGS = 16
MAX_CREATE = 10_000  # tokens in one create
MAX_LIVE = 20_000  # tokens kept at any time
MAX_EXPIRES = 30 * 86400  # the longest a token may live, in seconds
KEEP = 7 * 86400.0  # ended tokens stay listed this long
FILE_MODE = 0o640


class TokenError(CtrlExecError):
    """A token operation failed; the message is fit for an operator."""


class TokenRefused(TokenError):
    """A presented token approves nothing; ``reason`` is one of ``malformed``, ``unknown``,
    ``forged`` (known id, wrong secret), ``revoked``, ``expired``, ``used``,
    ``name-registered``."""

    def __init__(self, reason: str, token_id: str = "") -> None:
        super().__init__(f"pairing token refused: {reason}")
        self.reason = reason
        self.token_id = token_id


@dataclass(frozen=True)
class Claim:
    token_id: str
    tags: dict[str, str]


def store_path(ca_dir: str | Path) -> Path:
    return Path(ca_dir) / STORE


def new_token() -> tuple[str, str]:
    """``(id, token)``: a fresh random token (the caller keeps the clear text)."""
    token_id = secrets.token_hex(5)
    return token_id, f"{PREFIX}.{token_id}.{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id_of(token: str) -> str | None:
    """The id of a well-formed token, else None."""
    m = TOKEN_RE.fullmatch(token)
    return m[1] if m else None


def parse_tags(text: str) -> dict[str, str]:
    """``k=v,k=v`` into a dict; :class:`TokenError` naming the bad part."""
    tags: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not TAG_RE.fullmatch(k) or not TAG_RE.fullmatch(v):
            raise TokenError(f"bad tag {part!r}: expected key=value (letters, digits, _ . -)")
        tags[k] = v
    return check_tags(tags)


def check_tags(tags: object) -> dict[str, str]:
    if not isinstance(tags, dict) or len(tags) > MAX_TAGS:
        raise TokenError(f"tags must be at most {MAX_TAGS} key=value pairs")
    for k, v in tags.items():
        if not (isinstance(k, str) and isinstance(v, str) and TAG_RE.fullmatch(k)
                and TAG_RE.fullmatch(v)):  # fmt: skip
            raise TokenError(f"bad tag {k!r}={v!r}")
    return dict(tags)


def parse_duration(text: str) -> int:
    """``90s``, ``30m``, ``24h``, ``7d`` (or plain seconds) as seconds, 1..MAX_EXPIRES."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*([smhd]?)\s*", text)
    if not m:
        raise TokenError(f"bad duration {text!r}: expected N[s|m|h|d], e.g. 24h")
    seconds = int(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    if not 1 <= seconds <= MAX_EXPIRES:
        raise TokenError(f"--expires must be between 1 s and {MAX_EXPIRES // 86400} days")
    return seconds


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@contextlib.contextmanager
def _locked(ca_dir: str | Path) -> Iterator[None]:
    d = Path(ca_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(ca_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The token records; a missing store is empty, a damaged one is an error (never
    silently empty: that would forget which tokens were used)."""
    path = store_path(ca_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise TokenError(f"{path}: not valid JSON; the token store is damaged") from None
    tokens = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(tokens, dict):
        raise TokenError(f"{path}: no 'tokens' object; the token store is damaged")
    return {k: v for k, v in tokens.items() if ID_RE.fullmatch(k) and isinstance(v, dict)}


def _ended_at(rec: Mapping[str, Any]) -> float | None:
    used = rec.get("used")
    if isinstance(used, dict):
        return float(used.get("t", 0))
    if rec.get("revoked"):
        return float(rec.get("revoked_t", 0))
    return None


def _prune(tokens: dict[str, dict[str, Any]], now: float) -> None:
    for tid in list(tokens):
        rec = tokens[tid]
        ended = _ended_at(rec)
        if ended is None:
            ended = float(rec.get("expires", 0))
        if now - ended > KEEP:
            del tokens[tid]


def _save(ca_dir: str | Path, tokens: dict[str, dict[str, Any]], w: StateWriter) -> None:
    w.write(store_path(ca_dir), dumps({"version": 1, "tokens": tokens}), FILE_MODE)


def state(rec: Mapping[str, Any], now: float) -> str:
    if isinstance(rec.get("used"), dict):
        return "used"
    if rec.get("revoked"):
        return "revoked"
    if now >= float(rec.get("expires", 0)):
        return "expired"
    return "unused"


# ----- operator side --------------------------------------------------------------------


def add(
    ca_dir: str | Path, hashes: Mapping[str, str], *, expires_in: int,
    tags: Mapping[str, str] | None = None, re_pair: bool = False,
    writer: StateWriter | None = None, now: float | None = None,
) -> list[str]:  # fmt: skip
    """Store the hashes of new tokens (``{id: sha256}``); their ids. Nothing is stored
    unless every entry is well formed and new. ``re_pair``: the tokens may approve a
    name that is registered already (re-pairing); without it such a request is left to
    an operator, so a token cannot take over a registered agent's name."""
    t = time.time() if now is None else now
    if not 1 <= expires_in <= MAX_EXPIRES:
        raise TokenError(f"expires must be between 1 s and {MAX_EXPIRES // 86400} days")
    if not hashes or len(hashes) > MAX_CREATE:
        raise TokenError(f"create between 1 and {MAX_CREATE} tokens at a time")
    clean_tags = check_tags(dict(tags or {}))
    for tid, h in hashes.items():
        if not (isinstance(tid, str) and ID_RE.fullmatch(tid) and isinstance(h, str)
                and HASH_RE.fullmatch(h)):  # fmt: skip
            raise TokenError("malformed token entry: ids are 10 hex, hashes 64 hex characters")
    w = writer or default_writer()
    with _locked(ca_dir):
        tokens = _load(ca_dir)
        _prune(tokens, t)
        clash = sorted(set(hashes) & set(tokens))
        if clash:
            raise TokenError(f"token id(s) already exist: {', '.join(clash[:5])}")
        if len(tokens) + len(hashes) > MAX_LIVE:
            raise TokenError(f"more than {MAX_LIVE} tokens would be kept: revoke some first")
        for tid, h in hashes.items():
            tokens[tid] = {"sha256": h, "created": _iso(t), "expires": t + expires_in,
                           "tags": clean_tags, "re_pair": bool(re_pair), "used": None,
                           "revoked": False}  # fmt: skip
        _save(ca_dir, tokens, w)
    return sorted(hashes)


def listing(ca_dir: str | Path, now: float | None = None) -> list[dict[str, Any]]:
    """Every kept token without its hash: id, state, created, expires, tags, used."""
    t = time.time() if now is None else now
    out = []
    for tid, rec in sorted(_load(ca_dir).items(), key=lambda kv: (str(kv[1].get("created")),
                                                                  kv[0])):  # fmt: skip
        used = rec.get("used") if isinstance(rec.get("used"), dict) else None
        out.append({"id": tid, "state": state(rec, t), "created": rec.get("created"),
                    "expires": _iso(float(rec.get("expires", 0))),
                    "tags": rec.get("tags") or {}, "re_pair": bool(rec.get("re_pair")),
                    "used_by": (used or {}).get("hostname"), "reqid": (used or {}).get("reqid"),
                    "used_at": _iso(float(used["t"])) if used else None})  # fmt: skip
    return out


def revoke(
    ca_dir: str | Path, ids: list[str] | None, *, writer: StateWriter | None = None,
    now: float | None = None,
) -> list[str]:  # fmt: skip
    """Revoke ``ids`` (every unused token when None); the ids revoked. An unknown id
    refuses the whole call (nothing revoked)."""
    t = time.time() if now is None else now
    w = writer or default_writer()
    with _locked(ca_dir):
        tokens = _load(ca_dir)
        if ids is None:
            chosen = [tid for tid, rec in tokens.items() if state(rec, t) == "unused"]
        else:
            unknown = sorted(i for i in ids if i not in tokens)
            if unknown:
                raise TokenError(f"no such token: {', '.join(unknown[:5])}")
            chosen = [i for i in ids if state(tokens[i], t) in ("unused", "expired")]
        for tid in chosen:
            tokens[tid]["revoked"] = True
            tokens[tid]["revoked_t"] = t
        if chosen:
            _prune(tokens, t)
            _save(ca_dir, tokens, w)
    return sorted(chosen)


# ----- the pairing listener's side --------------------------------------------------------


def peek(ca_dir: str | Path, token: str, now: float | None = None) -> Claim:
    """What :func:`claim` would accept, without marking anything (no lock, no write)."""
    t = time.time() if now is None else now
    tid, rec = _check(_load(ca_dir), token, t)
    return Claim(tid, dict(rec.get("tags") or {}))


def _check(tokens: dict[str, dict[str, Any]], token: object, now: float
           ) -> tuple[str, dict[str, Any]]:  # fmt: skip
    tid = token_id_of(token) if isinstance(token, str) else None
    if tid is None:
        raise TokenRefused("malformed")
    rec = tokens.get(tid)
    if rec is None:
        raise TokenRefused("unknown", tid)
    assert isinstance(token, str)
    if not hmac.compare_digest(token_hash(token), str(rec.get("sha256", ""))):
        raise TokenRefused("forged", tid)
    st = state(rec, now)
    if st != "unused":
        raise TokenRefused(st, tid)
    return tid, rec


def claim(
    ca_dir: str | Path, token: object, *, reqid: str, hostname: str, source_ip: str,
    registered: bool = False, writer: StateWriter | None = None, now: float | None = None,
) -> Claim:  # fmt: skip
    """Mark ``token`` used by request ``reqid``, atomically (one locked read-check-write);
    :class:`TokenRefused` when it approves nothing (``name-registered``: ``hostname`` is
    ``registered`` and the token is not a re-pairing one; the token stays unused)."""
    t = time.time() if now is None else now
    w = writer or default_writer()
    with _locked(ca_dir):
        tokens = _load(ca_dir)
        tid, rec = _check(tokens, token, t)
        if registered and not rec.get("re_pair"):
            raise TokenRefused("name-registered", tid)
        rec["used"] = {"t": t, "reqid": reqid, "hostname": hostname, "source_ip": source_ip}
        _save(ca_dir, tokens, w)
    return Claim(tid, dict(rec.get("tags") or {}))


def release(ca_dir: str | Path, token_id: str, reqid: str,
            writer: StateWriter | None = None) -> bool:  # fmt: skip
    """Undo the claim of ``token_id`` by ``reqid`` (its request was never queued)."""
    w = writer or default_writer()
    with _locked(ca_dir):
        tokens = _load(ca_dir)
        rec = tokens.get(token_id)
        used = rec.get("used") if rec is not None else None
        if rec is None or not isinstance(used, dict) or used.get("reqid") != reqid:
            return False
        rec["used"] = None
        _save(ca_dir, tokens, w)
    return True
