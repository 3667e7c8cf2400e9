"""Agent registry: one JSON record per agent, ``<registry_dir>/<name>.json`` (spec 7.1).

Record fields are upstream's, plus the agent certificate pins ``cert_serial``,
``pubkey_sha256`` and ``cert_serial_next`` (a renewed cert not yet adopted): an upstream
dispatcher reads the record by key and ignores them, and its read-modify-write updates keep
them; an upstream record without them is accepted and pinned on first contact
(:mod:`dispatcher.client.pins`). Every write goes through a :class:`StateWriter`;
read-modify-write updates hold an exclusive ``flock`` on ``.registry.lock``. The lock is
re-entrant within one process (per thread), so ``with reg.locked(): reg.update(...)``
does not deadlock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeGuard

from agent.common import logfmt
from agent.common.errors import CtrlExecError
from agent.common.records import record
from dispatcher.client.pins import Pins, from_record
from dispatcher.statewrite import StateWriter, default_writer, write_json

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_PORT = 7443
RECORD_MODE = 0o644
LOCK_NAME = ".registry.lock"
SERIAL_STATUSES = ("current", "pending", "stale", "unknown")
LOOKUP_BY = ("hostname", "ip")
FIELDS = (
    "hostname",
    "ip",
    "paired",
    "expiry",
    "reqid",
    "lookup_by",
    "port",
    "tags",
    "dispatcher_serial",
    "serial_status",
    "serial_broadcast",
    "serial_confirmed",
    "cert_serial",
    "pubkey_sha256",
    "cert_serial_next",
)
PIN_FIELDS = ("cert_serial", "pubkey_sha256", "cert_serial_next")
_HEX_RE = re.compile(r"^[0-9a-f]*$")
_TARGET_RE = re.compile(r"^(.+):(\d+)$")
_LIST_FROM = 16  # resolve more references than this against one directory listing


class RegistryError(CtrlExecError):
    """Bad agent name, missing or unreadable record, or a refused change."""


def utc_now() -> str:
    """Current time as upstream's ISO-8601 UTC string ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def valid_port(port: object) -> TypeGuard[int]:
    return isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535


def _check_fields(fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if key not in FIELDS or key == "hostname":
            raise RegistryError(f"unknown or read-only registry field '{key}'")
        if key == "port" and not valid_port(value):
            raise RegistryError(f"invalid port {value!r}")
        if key == "lookup_by" and value not in LOOKUP_BY:
            raise RegistryError(f"lookup_by must be hostname or ip, got {value!r}")
        if key == "serial_status" and value not in SERIAL_STATUSES:
            raise RegistryError(f"invalid serial_status {value!r}")
        if key == "tags" and not (
            isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        ):
            raise RegistryError("tags must be an object of strings")
        if key not in ("port", "tags") and not isinstance(value, str):
            raise RegistryError(f"{key} must be a string")
        if key in PIN_FIELDS and not _HEX_RE.fullmatch(value):
            raise RegistryError(f"{key} must be lower-case hex, got {value!r}")


class _FileLock:
    """Process-wide re-entrant exclusive flock on one path."""

    _all: dict[str, _FileLock] = {}
    _guard = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None

    @classmethod
    def of(cls, path: Path) -> _FileLock:
        key = os.path.abspath(path)
        with cls._guard:
            lock = cls._all.get(key)
            if lock is None:
                lock = cls._all[key] = cls(key)
            return lock

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self.rlock:
            if self.depth == 0:
                self.fd = self._open()
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0 and self.fd is not None:
                    os.close(self.fd)  # closing releases the flock
                    self.fd = None

    def _open(self) -> int | None:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o660)
        except OSError as exc:  # upstream: best effort, proceed unlocked
            logfmt.event("registry-lock-fail", logfmt.WARNING, path=self.path, error=exc)
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd


class Registry:
    """The agent registry in one directory."""

    def __init__(self, registry_dir: str | Path, writer: StateWriter | None = None) -> None:
        self.dir = Path(registry_dir)
        self.writer = writer if writer is not None else default_writer()

    def path_of(self, name: str) -> Path:
        """Record path for ``name``; RegistryError if the name is not a safe registry key."""
        if not valid_name(name):
            raise RegistryError(f"invalid agent name {name!r}")
        return self.dir / f"{name}.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive registry lock (``flock`` on ``.registry.lock``), re-entrant."""
        with _FileLock.of(self.dir / LOCK_NAME).hold():
            yield

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        names = (e[: -len(".json")] for e in entries if e.endswith(".json"))
        return sorted(n for n in names if valid_name(n))

    def _read(self, name: str) -> dict[str, Any] | None:
        """The record, None if absent; RegistryError if unreadable."""
        path = self.path_of(name)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"registry entry for '{name}' is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"registry entry for '{name}' is not a JSON object")
        return data

    def get(self, name: str) -> dict[str, Any] | None:
        """The record of ``name``, or None if absent or unreadable (logged)."""
        try:
            return self._read(name)
        except RegistryError as exc:
            if not valid_name(name):
                raise
            logfmt.event("registry-read-fail", logfmt.WARNING, agent=name, error=exc)
            return None

    def all(self) -> list[dict[str, Any]]:
        """Every readable record, sorted by hostname."""
        records = []
        for name in self.names():
            rec = self.get(name)
            if rec is not None:
                records.append(rec)
        return sorted(records, key=lambda r: str(r.get("hostname", "")))

    def _write(self, name: str, record: dict[str, Any]) -> None:
        write_json(self.writer, self.path_of(name), record, RECORD_MODE)

    def register(
        self,
        name: str,
        *,
        ip: str,
        port: int = DEFAULT_PORT,
        lookup_by: str = "hostname",
        reqid: str = "",
        expiry: str = "",
        dispatcher_serial: str = "",
        tags: dict[str, str] | None = None,
        cert_serial: str = "",
        pubkey_sha256: str = "",
    ) -> dict[str, Any]:
        """Write (or overwrite) the record of a newly paired agent.

        ``cert_serial`` and ``pubkey_sha256`` pin the certificate signed at approval.
        """
        self.path_of(name)
        now = utc_now()
        record: dict[str, Any] = {
            "hostname": name,
            "ip": ip,
            "paired": now,
            "expiry": expiry,
            "reqid": reqid,
            "lookup_by": lookup_by,
            "port": port,
            "tags": dict(tags or {}),
            "dispatcher_serial": dispatcher_serial,
            "serial_status": "current" if dispatcher_serial else "unknown",
            "serial_broadcast": "",
            "serial_confirmed": now if dispatcher_serial else "",
        }
        if cert_serial:
            record.update(cert_serial=cert_serial, pubkey_sha256=pubkey_sha256,
                          cert_serial_next="")  # fmt: skip
        _check_fields({k: v for k, v in record.items() if k != "hostname"})
        with self.locked():
            self._write(name, record)
        return record

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into an existing record under the lock; returns the new record."""
        _check_fields(fields)
        with self.locked():
            record = self._read(name)
            if record is None:
                raise RegistryError(f"no registry entry for '{name}'")
            record.update(fields)
            self._write(name, record)
            return record

    def update_many(self, names: Iterable[str], **fields: Any) -> int:
        """Merge ``fields`` into each existing record under one lock; returns how many.

        Absent or unreadable records are skipped (unreadable ones are logged).
        """
        _check_fields(fields)
        todo = list(names)
        for name in todo:
            self.path_of(name)  # validate every name before writing any
        count = 0
        with self.locked():
            for name in todo:
                record = self.get(name)
                if record is None:
                    continue
                record.update(fields)
                self._write(name, record)
                count += 1
        return count

    def delete(self, name: str) -> bool:
        """Remove the record; False if there was none."""
        path = self.path_of(name)
        with self.locked():
            return self.writer.delete(path)

    def rename(self, old: str, new: str) -> dict[str, Any]:
        """Move a record to a new name (refuses to overwrite); returns the moved record."""
        new_path = self.path_of(new)
        with self.locked():
            record = self._read(old)
            if record is None:
                raise RegistryError(f"no registry entry for '{old}'")
            if new == old:
                return record
            if new_path.exists():
                raise RegistryError(f"agent '{new}' already exists")
            record["hostname"] = new
            self._write(new, record)
            self.writer.delete(self.path_of(old))
            return record


@record(frozen=True)
class Target:
    """What the fan-out connects to."""

    name: str
    address: str
    port: int
    pins: Pins | None = None


def _record_port(record: dict[str, Any], default_port: int) -> int:
    port = record.get("port")
    return port if valid_port(port) else default_port


def _target(
    registry: Registry, name: str, explicit: int | None, default_port: int
) -> Target | None:
    record = registry.get(name)
    if record is None:
        return None
    address = str(record.get("hostname") or name)
    if record.get("lookup_by") == "ip" and record.get("ip"):
        address = str(record["ip"])
    port = explicit if explicit is not None else _record_port(record, default_port)
    return Target(name, address, port, from_record(record))


def resolve(
    registry: Registry, targets: list[str], default_port: int = DEFAULT_PORT
) -> list[Target]:
    """Resolve ``name`` / ``name:port`` references through the registry only (spec 1.2).

    Port: explicit ``:port`` > record port > ``default_port``. Exact duplicates are
    dropped. Any unknown (or invalid) name raises RegistryError naming all of them.
    Linear in the number of references: a long list is checked against one directory
    listing before any record is read, and each record is read once.
    """
    known = set(registry.names()) if len(targets) > _LIST_FROM else None
    made: dict[tuple[str, int | None], Target | None] = {}
    resolved: dict[Target, None] = {}
    unknown: dict[str, None] = {}
    for ref in targets:
        m = _TARGET_RE.match(ref)
        name, explicit = (m.group(1), int(m.group(2))) if m else (ref, None)
        if explicit is not None and not valid_port(explicit):
            raise RegistryError(f"invalid port in '{ref[:80]}'")
        if not valid_name(name) or (known is not None and name not in known):
            unknown[ref] = None
            continue
        key = (name, explicit)
        if key in made:  # a repeated reference: nothing new
            if made[key] is None:
                unknown[ref] = None
            continue
        target = made[key] = _target(registry, name, explicit, default_port)
        if target is None:
            unknown[ref] = None
        else:
            resolved.setdefault(target, None)
    if unknown:
        names = list(unknown)
        shown = ", ".join(names[:20]) + (
            f" (and {len(names) - 20} more)" if len(names) > 20 else ""
        )
        raise RegistryError(f"unknown agent(s): {shown}")
    return list(resolved)
