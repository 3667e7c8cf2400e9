"""The key-value primitives both backends stand on, and the embedded local store.

:class:`Store` is what :class:`cluster.etcd.EtcdClient` offers; :class:`LocalStore` offers
the same on one host, in a state directory, with etcd's semantics where they matter:
a global revision that only grows (persisted), create/mod revisions per key, leases whose
keys vanish with them, and transactions. A local lease is a ``flock`` held on
``leases/<id>.lock`` by the process that granted it: it lives exactly as long as that
process holds the descriptor, so a crash frees it, like a lease expiring. Every operation
runs under a ``flock`` on ``kv.lock`` and rewrites ``kv.json`` atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cluster.errors import BackendUnavailable
from cluster.locks import try_flock


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_rev: int
    mod_rev: int
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["PUT", "DELETE"]
    key: str
    value: bytes
    mod_rev: int


class Store(Protocol):
    """Key-value operations with leases, revisions and transactions (etcd v3 shaped)."""

    def identity(self) -> str:
        """Which store this is (a rebuilt etcd is another one)."""
        ...

    def lease_grant(self, ttl: int) -> tuple[int, int]: ...

    def lease_keepalive(self, lease_id: int) -> int: ...

    def lease_revoke(self, lease_id: int) -> None: ...

    def get(self, key: str) -> KeyValue | None: ...

    def get_prefix(self, prefix: str) -> list[KeyValue]: ...

    def put(self, key: str, value: str | bytes, lease: int | None = None) -> int: ...

    def delete(self, key: str) -> bool: ...

    def revision(self) -> int: ...

    def txn_create_if_absent(
        self, key: str, value: str | bytes, lease: int
    ) -> tuple[bool, int]: ...

    def txn_create_all_if_absent(
        self, items: Mapping[str, str | bytes], lease: int
    ) -> list[str]: ...

    def txn_create_or_get(
        self, key: str, value: str | bytes, lease: int
    ) -> tuple[bool, KeyValue | None]:
        """Create ``key`` bound to ``lease`` if absent: ``(True, None)``; else
        ``(False, the key as it is)`` (read in the same transaction; None: gone meanwhile)."""
        ...

    def txn_put_if_lease(self, key: str, value: str | bytes, lease: int) -> bool:
        """Write ``key`` (keeping it bound to ``lease``) only while it is bound to ``lease``."""
        ...

    def txn_delete_if_lease(self, key: str, lease: int) -> bool:
        """Delete ``key`` only while it is bound to ``lease``; True if deleted."""
        ...

    def txn_delete_if_value(self, items: Mapping[str, str | bytes]) -> None: ...

    def txn_put_if_epoch(
        self,
        leader_key: str,
        epoch: int,
        puts: Mapping[str, str | bytes],
        deletes: Sequence[str] = (),
    ) -> tuple[bool, int]: ...

    def watch_once(
        self, key: str, timeout: float, start_revision: int | None = None
    ) -> WatchEvent | None: ...

    def close(self) -> None: ...


def _raw(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


class _Data:
    """The decoded ``kv.json``: revision, keys and the last delete revision of each key."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.rev: int = int(doc.get("rev", 0))
        self.kvs: dict[str, dict[str, Any]] = dict(doc.get("kvs", {}))
        self.deleted: dict[str, int] = dict(doc.get("deleted", {}))
        self.dirty = False

    def doc(self) -> dict[str, Any]:
        return {"rev": self.rev, "kvs": self.kvs, "deleted": self.deleted}

    def kv(self, key: str) -> KeyValue | None:
        e = self.kvs.get(key)
        if e is None:
            return None
        return KeyValue(key, bytes.fromhex(e["v"]), e["c"], e["m"], e["l"])

    def bump(self) -> int:
        self.rev += 1
        self.dirty = True
        return self.rev

    def put(self, key: str, value: bytes, lease: int, rev: int) -> None:
        old = self.kvs.get(key)
        self.kvs[key] = {"v": value.hex(), "c": old["c"] if old else rev, "m": rev, "l": lease}
        self.dirty = True

    def delete(self, key: str, rev: int) -> bool:
        if self.kvs.pop(key, None) is None:
            return False
        self.deleted[key] = rev
        self.dirty = True
        return True


class LocalStore:
    """:class:`Store` in a local directory (see the module docstring)."""

    def identity(self) -> str:
        """This store's id (``store-id`` in its directory, made once; a new directory is a
        new store)."""
        path = self.dir / "store-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            import uuid

            tmp = self.dir / f".store-id.{os.getpid()}"
            tmp.write_text(uuid.uuid4().hex + "\n")
            try:
                os.link(tmp, path)  # the first writer wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            return path.read_text().strip()

    POLL = 0.025

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        (self.dir / "leases").mkdir(mode=0o700, parents=True, exist_ok=True)
        self._kv_file = self.dir / "kv.json"
        self._lock_file = self.dir / "kv.lock"
        self._held: dict[int, tuple[int, int]] = {}  # lease id -> (fd, ttl)
        self._mutex = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------

    def _lease_path(self, lease_id: int) -> Path:
        return self.dir / "leases" / f"{lease_id}.lock"

    def _lease_alive(self, lease_id: int) -> bool:
        with self._mutex:
            if lease_id in self._held:
                return True
        try:
            fd = os.open(self._lease_path(lease_id), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            if try_flock(fd):  # nobody holds it: the granting process is gone
                with contextlib.suppress(FileNotFoundError):
                    self._lease_path(lease_id).unlink()
                return False
            return True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _data(self) -> Iterator[_Data]:
        """The store under its lock, with keys of dead leases swept; saved if changed."""
        try:
            fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise BackendUnavailable(f"local store {self.dir}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                data = _Data(json.loads(self._kv_file.read_text()))
            except FileNotFoundError:
                data = _Data({})
            self._sweep(data)
            yield data
            if data.dirty:
                tmp = self._kv_file.with_suffix(".tmp")
                with open(tmp, "w") as f:
                    json.dump(data.doc(), f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._kv_file)
        finally:
            os.close(fd)

    def _sweep(self, data: _Data) -> None:
        leases = {e["l"] for e in data.kvs.values() if e["l"]}
        dead = {lease for lease in leases if not self._lease_alive(lease)}
        if dead:
            rev = data.bump()
            for key in [k for k, e in data.kvs.items() if e["l"] in dead]:
                data.delete(key, rev)

    def _check_lease(self, data: _Data, lease: int | None) -> None:
        if lease and not self._lease_alive(lease):
            raise BackendUnavailable(f"lease {lease} not found")

    # -- leases ----------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> tuple[int, int]:
        lease_id = secrets.randbits(62) + 1
        fd = os.open(self._lease_path(lease_id), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with self._mutex:
            self._held[lease_id] = (fd, int(ttl))
        return lease_id, int(ttl)

    def lease_keepalive(self, lease_id: int) -> int:
        with self._mutex:
            held = self._held.get(lease_id)
        return held[1] if held else -1

    def lease_revoke(self, lease_id: int) -> None:
        with self._mutex:
            held = self._held.pop(lease_id, None)
        with self._data() as data:
            keys = [k for k, e in data.kvs.items() if e["l"] == lease_id]
            if keys:
                rev = data.bump()
                for key in keys:
                    data.delete(key, rev)
        if held:
            with contextlib.suppress(FileNotFoundError):
                self._lease_path(lease_id).unlink()
            os.close(held[0])

    # -- keys ------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        with self._data() as data:
            return data.kv(key)

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        with self._data() as data:
            return [kv for k in sorted(data.kvs) if k.startswith(prefix) if (kv := data.kv(k))]

    def put(self, key: str, value: str | bytes, lease: int | None = None) -> int:
        with self._data() as data:
            self._check_lease(data, lease)
            rev = data.bump()
            data.put(key, _raw(value), lease or 0, rev)
            return rev

    def delete(self, key: str) -> bool:
        with self._data() as data:
            if key not in data.kvs:
                return False
            return data.delete(key, data.bump())

    def revision(self) -> int:
        with self._data() as data:
            return data.rev

    # -- transactions ------------------------------------------------------------------------

    def txn_create_if_absent(self, key: str, value: str | bytes, lease: int) -> tuple[bool, int]:
        with self._data() as data:
            existing = data.kv(key)
            if existing is not None:
                return existing.lease == lease and lease != 0, existing.create_rev
            self._check_lease(data, lease)
            rev = data.bump()
            data.put(key, _raw(value), lease, rev)
            return True, rev

    def txn_create_all_if_absent(self, items: Mapping[str, str | bytes], lease: int) -> list[str]:
        if not items:
            return []
        with self._data() as data:
            present = [kv for k in items if (kv := data.kv(k)) is not None]
            if present:
                return [
                    kv.key
                    for kv in present
                    if not (kv.lease == lease and kv.value == _raw(items[kv.key]))
                ]
            self._check_lease(data, lease)
            rev = data.bump()
            for key, value in items.items():
                data.put(key, _raw(value), lease, rev)
            return []

    def txn_create_or_get(
        self, key: str, value: str | bytes, lease: int
    ) -> tuple[bool, KeyValue | None]:
        with self._data() as data:
            existing = data.kv(key)
            if existing is not None:
                return False, existing
            self._check_lease(data, lease)
            data.put(key, _raw(value), lease, data.bump())
            return True, None

    def txn_put_if_lease(self, key: str, value: str | bytes, lease: int) -> bool:
        with self._data() as data:
            existing = data.kv(key)
            if existing is None or not lease or existing.lease != lease:
                return False
            data.put(key, _raw(value), lease, data.bump())
            return True

    def txn_delete_if_lease(self, key: str, lease: int) -> bool:
        with self._data() as data:
            existing = data.kv(key)
            if existing is None or not lease or existing.lease != lease:
                return False
            return data.delete(key, data.bump())

    def txn_delete_if_value(self, items: Mapping[str, str | bytes]) -> None:
        with self._data() as data:
            mine = [
                k
                for k, v in items.items()
                if (kv := data.kv(k)) is not None and kv.value == _raw(v)
            ]
            if mine:
                rev = data.bump()
                for key in mine:
                    data.delete(key, rev)

    def txn_put_if_epoch(
        self,
        leader_key: str,
        epoch: int,
        puts: Mapping[str, str | bytes],
        deletes: Sequence[str] = (),
    ) -> tuple[bool, int]:
        with self._data() as data:
            leader = data.kv(leader_key)
            if epoch <= 0 or leader is None or leader.create_rev != epoch:
                return False, data.rev
            if not puts and not deletes:
                return True, data.rev
            rev = data.bump()
            for key, value in puts.items():
                data.put(key, _raw(value), 0, rev)
            for key in deletes:
                data.delete(key, rev)
            return True, rev

    # -- watch -------------------------------------------------------------------------------

    def watch_once(
        self, key: str, timeout: float, start_revision: int | None = None
    ) -> WatchEvent | None:
        """Polls every 25 ms; reports the latest change at or after ``start_revision``."""
        deadline = time.monotonic() + timeout
        with self._data() as data:
            since = start_revision or data.rev + 1
        while True:
            with self._data() as data:
                kv = data.kv(key)
                if kv is not None and kv.mod_rev >= since:
                    return WatchEvent("PUT", key, kv.value, kv.mod_rev)
                gone = data.deleted.get(key, 0)
                if kv is None and gone >= since:
                    return WatchEvent("DELETE", key, b"", gone)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(self.POLL, left))

    def close(self) -> None:
        """Forget this process's leases without revoking them (their keys go at next sweep)."""
        with self._mutex:
            held, self._held = self._held, {}
        for fd, _ttl in held.values():
            os.close(fd)
