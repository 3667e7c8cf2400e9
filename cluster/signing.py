"""Records the instances sign: etcd carries coordination, never authority.

Whoever can write to the store must not be able to make an instance act. Every record an
instance acts on (generations, requests for leader-only work and their results, restart
orders, switchover and pause records) is sealed by the instance that writes it with a key
only dispatcher instances hold (``<ca_dir>/cluster.key``, 32 random bytes, mode 0600) and
opened, that is verified, by the instance that reads it, before anything is done.

The envelope is one JSON object::

    {"v": 1, "kind": "<kind>", "body": <payload>, "mac": "<hex HMAC-SHA256>"}

The MAC covers the kind, the store key the record lives under and the canonical JSON of
the body (sorted keys, no spaces), so a sealed record cannot be replayed under another key
or read as another kind. :meth:`RecordSigner.open` raises :class:`RecordRejected` for a
record that does not parse, is of another kind or key, or fails the MAC; an instance
without the key refuses every record (fail closed).

:class:`Rejections` keeps the count per kind (for metrics) and logs each rejected store key
once (bounded memory), so a flood of junk never floods the log.

Standard library only (``hmac``, ``hashlib``, ``secrets``); the library never reads the
dispatcher configuration: callers hand it a key or a :class:`KeyFile`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.errors import ClusterError

VERSION = 1
KEY_BYTES = 32
KEY_FILE = "cluster.key"  # under the dispatcher's ca_dir: replicated with the CA files

log = logging.getLogger("ctrl-exec.cluster.signing")


class RecordRejected(ClusterError):
    """A record failed verification or did not parse; the instance ignores it."""

    def __init__(self, kind: str, key: str, reason: str) -> None:
        self.kind = kind
        self.key = key
        self.reason = reason
        super().__init__(f"{kind} record {key}: {reason}")


class NoClusterKey(RecordRejected):
    """This instance holds no cluster key: it can neither seal nor open (fail closed)."""


def canonical(body: Any) -> bytes:
    """The bytes the MAC covers for ``body`` (sorted keys, compact, ASCII)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(key: bytes, kind: str, store_key: str, body: bytes) -> str:
    msg = b"\0".join([b"ctrl-exec-record-v1", kind.encode(), store_key.encode(), body])
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


KeySource = Callable[[], "bytes | None"]


class RecordSigner:
    """Seal and open records with the cluster key (``key``: the bytes, or a callable that
    returns the current key or None, such as a :class:`KeyFile`)."""

    def __init__(self, key: bytes | KeySource | None) -> None:
        if key is None or isinstance(key, bytes):
            fixed = key
            self._source: KeySource = lambda: fixed
        else:
            self._source = key
        if isinstance(key, bytes) and len(key) < 16:
            raise ValueError("cluster key too short (at least 16 bytes)")

    def key(self) -> bytes | None:
        return self._source()

    @property
    def available(self) -> bool:
        return self.key() is not None

    def _need_key(self, kind: str, store_key: str) -> bytes:
        k = self.key()
        if k is None:
            raise NoClusterKey(kind, store_key, "this instance holds no cluster key")
        return k

    def seal(self, kind: str, store_key: str, payload: Any) -> str:
        """The envelope of ``payload`` (a JSON value) for ``store_key``."""
        k = self._need_key(kind, store_key)
        body = json.loads(canonical(payload))  # the canonical form is what is stored
        return json.dumps({"v": VERSION, "kind": kind, "body": body,
                           "mac": _mac(k, kind, store_key, canonical(body))},
                          sort_keys=True, separators=(",", ":"))  # fmt: skip

    def open(self, kind: str, store_key: str, raw: bytes | str | None) -> Any:
        """The payload of a sealed record; :class:`RecordRejected` unless it verifies."""
        if raw is None:
            raise RecordRejected(kind, store_key, "no record")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordRejected(kind, store_key, f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or not {"v", "kind", "body", "mac"} <= set(doc):
            raise RecordRejected(kind, store_key, "not a sealed record (unsigned)")
        if doc["v"] != VERSION:
            raise RecordRejected(kind, store_key, f"unknown envelope version {doc['v']!r}")
        if doc["kind"] != kind:
            raise RecordRejected(kind, store_key, f"a {str(doc['kind'])[:40]!r} record")
        mac = doc["mac"]
        if not isinstance(mac, str):
            raise RecordRejected(kind, store_key, "malformed MAC")
        k = self._need_key(kind, store_key)
        want = _mac(k, kind, store_key, canonical(doc["body"]))
        if not hmac.compare_digest(want, mac):
            raise RecordRejected(kind, store_key, "bad MAC (not sealed with the cluster key)")
        return doc["body"]

    def mac(self, purpose: str, data: bytes) -> str:
        """An HMAC of ``data`` for another ``purpose`` (such as a forwarding assertion)."""
        k = self._need_key(purpose, "")
        return _mac(k, purpose, "", data)

    def check_mac(self, purpose: str, data: bytes, mac: str) -> bool:
        k = self.key()
        return k is not None and hmac.compare_digest(_mac(k, purpose, "", data), mac)


class Rejections:
    """Rejected records: a count per kind, and one log line per store key (bounded)."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._counts: Counter[str] = Counter()
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def note(self, exc: RecordRejected, log_fn: Callable[[RecordRejected], None] | None = None,
             ) -> bool:  # fmt: skip
        """Count ``exc``; True (and ``log_fn(exc)`` is called) the first time its key fails."""
        with self._lock:
            self._counts[exc.kind] += 1
            tag = f"{exc.kind}\0{exc.key}"
            if tag in self._logged:
                return False
            if len(self._logged) >= self.limit:  # junk written in bulk: bounded memory
                self._logged.clear()
            self._logged.add(tag)
        if log_fn is not None:
            log_fn(exc)
        else:
            log.warning("record rejected: %s", exc)
        return True

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


# ----- the key file ------------------------------------------------------------------------


class KeyFile:
    """The cluster key in a file, read again whenever the file changes (a generation may
    replace it); None while the file is absent or unreadable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._key: bytes | None = None
        self.error = ""

    def __call__(self) -> bytes | None:
        try:
            st = self.path.stat()
        except OSError as exc:
            with self._lock:
                self._stamp, self._key, self.error = None, None, f"{self.path}: {exc.strerror}"
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp == self._stamp:
                return self._key
            try:
                self._key, self.error = parse_key(self.path.read_bytes(), self.path), ""
            except (OSError, ValueError) as exc:
                self._key, self.error = None, str(exc)
            self._stamp = stamp
            return self._key


def parse_key(raw: bytes, path: str | Path = "cluster.key") -> bytes:
    """The key in a key file: 64 hex digits (one line)."""
    text = raw.decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: not a cluster key (64 hex digits expected)") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path}: not a cluster key ({len(key)} bytes, {KEY_BYTES} expected)")
    return key


def _write_temp(p: Path, key: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _fsync_dir(d: Path) -> None:
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_key(path: str | Path, key: bytes | None = None) -> bytes:
    """Write a (new random) key to ``path`` atomically (replacing any), mode 0600."""
    key = key if key is not None else secrets.token_bytes(KEY_BYTES)
    p = Path(path)
    tmp = _write_temp(p, key)
    try:
        os.replace(tmp, p)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(p.parent)
    return key


def ensure_key(path: str | Path) -> tuple[bytes, bool]:
    """The key in ``path``, created when the file does not exist; ``(key, created)``.
    A file that exists but holds no valid key raises ValueError (never overwritten). Two
    processes creating it at once end with one key (the file is linked into place, which
    fails when it exists)."""
    p = Path(path)
    try:
        return parse_key(p.read_bytes(), p), False
    except FileNotFoundError:
        pass
    tmp = _write_temp(p, secrets.token_bytes(KEY_BYTES))
    try:
        os.link(tmp, p)
    except FileExistsError:
        return parse_key(p.read_bytes(), p), False
    finally:
        _unlink(tmp)
    _fsync_dir(p.parent)
    return parse_key(p.read_bytes(), p), True
