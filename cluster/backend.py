"""Coordination backends: the :class:`Backend` protocol, on etcd or on the local state dir.

Both implementations are the same logic (:class:`KVBackend`) over a :class:`Store`:
:class:`EtcdBackend` over :class:`cluster.etcd.EtcdClient` when ``etcd_endpoints`` is set,
:class:`LocalBackend` over :class:`cluster.store.LocalStore` (``flock`` in the state
directory) when it is empty. Keys, under ``/<cluster_name>/``::

    leader                  instance id; bound to the leader's lease; create_revision = epoch
    members/<instance_id>   MemberInfo JSON, bound to the member's lease; created only if
                            absent, changed and deleted only by the lease that holds it
    locks/<host>--<script>  run lock JSON (host, script, token, owner), bound to a lease
    generation              the published config generation's head (leader-only, fenced)
    generation-chunks/<sha> a chunk of a generation's manifest, named by its sha256 (fenced)
    effects/<epoch>-<uuid>  the history of leader-only effects, each with its epoch (the
                            records of one transaction: ``<epoch>-<uuid>-<index>``)
    runs/<reqid>            metadata of an async run (any instance), bound to a day-long lease
    switchover              a request that the leader of a given epoch resign, short lease
    orders/<instance_id>    an order of the leader to one member (restart), fenced, with its epoch
    requests/<id>           a request for the leader (from ``ced``), bound to a short lease
    results/<id>            the leader's answer to a request (fenced), deleted by the requester
    history/<epoch>         one term per leader: term number, previous leader, reason (fenced)
    handover                why the leader of an epoch resigned, and to whom (fenced)
    paused                  maintenance: no automatic leader work while present (operator)

Leader-only writes go through :meth:`Backend.fenced_commit`, a transaction that applies
only while the leader key's create revision is still the epoch the work started under.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from cluster.store import KeyValue, LocalStore, Store, WatchEvent

log = logging.getLogger("ctrl-exec.cluster")

MemberState = Literal["serving", "draining"]


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int


@dataclass(frozen=True)
class LeaderInfo:
    instance_id: str
    epoch: int
    lease: int


@dataclass(frozen=True)
class CampaignResult:
    won: bool
    leader: LeaderInfo | None
    revision: int  # mod revision of the leader key seen; watch from revision + 1 (0: none)


@dataclass(frozen=True)
class MemberInfo:
    instance_id: str
    advertise_url: str = ""
    version: str = ""
    cert_serial: str = ""
    generation: int = 0
    state: MemberState = "serving"
    health_port: int = 0  # where load balancers check this instance (0: unknown)
    pairing_port: int = 0  # where it listens for pairing while it leads (0: unknown)
    proxy_port: int = 0  # API port expecting a PROXY v2 header from the load balancer (0: none)
    pairing_proxy_port: int = 0  # pairing port expecting a PROXY v2 header (0: none)
    restart_pending: bool = False  # its certificates changed on disk since it loaded them
    pid: int = 0  # the process that holds the member key (0: not recorded)
    host: str = ""  # the host it runs on ("": not recorded)
    since: float = 0.0  # wall-clock time.time() it registered (0: not recorded)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> MemberInfo:
        d = json.loads(raw)
        return cls(
            instance_id=str(d["instance_id"]),
            advertise_url=str(d.get("advertise_url", "")),
            version=str(d.get("version", "")),
            cert_serial=str(d.get("cert_serial", "")),
            generation=int(d.get("generation", 0)),
            state="draining" if d.get("state") == "draining" else "serving",
            health_port=int(d.get("health_port", 0)),
            pairing_port=int(d.get("pairing_port", 0)),
            proxy_port=int(d.get("proxy_port", 0)),
            pairing_proxy_port=int(d.get("pairing_proxy_port", 0) or 0),
            restart_pending=bool(d.get("restart_pending", False)),
            pid=int(d.get("pid", 0) or 0),
            host=str(d.get("host", "") or ""),
            since=float(d.get("since", 0.0) or 0.0),
        )

    def holder(self) -> str:
        """Who holds this member key, for messages: URL, pid and host, since when."""
        parts = [f"advertising {self.advertise_url or '(no advertise_url)'}"]
        if self.pid or self.host:
            parts.append(f"pid {self.pid or '?'} on host {self.host or '?'}")
        if self.since:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
            parts.append(f"since {when}")
        return ", ".join(parts)


@dataclass(frozen=True)
class MemberClaim:
    """The outcome of :meth:`Backend.claim_member`."""

    held: bool  # the member key is bound to our lease now
    created: bool = False  # this very call created it
    holder: MemberInfo | None = None  # when not held: the record of whoever holds it
    holder_lease: int = 0


@dataclass(frozen=True)
class EffectRecord:
    key: str
    effect: str
    epoch: int
    instance_id: str
    revision: int  # the store revision at which it was committed
    at: float  # wall-clock time.time() of the commit request
    detail: dict[str, Any] = field(default_factory=dict)


class ClusterKeys:
    """Key layout of one cluster (see the module docstring)."""

    def __init__(self, cluster_name: str) -> None:
        if not cluster_name or "/" in cluster_name:
            raise ValueError(f"bad cluster name {cluster_name!r}")
        self.prefix = f"/{cluster_name}/"
        self.leader = f"{self.prefix}leader"
        self.members = f"{self.prefix}members/"
        self.locks = f"{self.prefix}locks/"
        self.generation = f"{self.prefix}generation"
        self.generation_chunks = f"{self.prefix}generation-chunks/"
        self.effects = f"{self.prefix}effects/"
        self.runs = f"{self.prefix}runs/"
        self.switchover = f"{self.prefix}switchover"
        self.orders = f"{self.prefix}orders/"
        self.requests = f"{self.prefix}requests/"
        self.results = f"{self.prefix}results/"
        self.history = f"{self.prefix}history/"
        self.handover = f"{self.prefix}handover"
        self.paused = f"{self.prefix}paused"

    def generation_chunk(self, sha256: str) -> str:
        return f"{self.generation_chunks}{sha256}"

    def member(self, instance_id: str) -> str:
        return f"{self.members}{instance_id}"

    def lock(self, host: str, script: str) -> str:
        return f"{self.locks}{host}--{script}"

    def effect(self, epoch: int) -> str:
        return f"{self.effects}{epoch:012d}-{uuid.uuid4().hex}"

    def effect_batch(self, epoch: int, count: int) -> list[str]:
        """Keys of ``count`` effect records committed in one transaction: they share its
        revision, and their keys (``<epoch>-<uuid>-<index>``) keep their order."""
        base = f"{self.effects}{epoch:012d}-{uuid.uuid4().hex}"
        return [f"{base}-{i:03d}" for i in range(count)]

    def history_term(self, epoch: int) -> str:
        return f"{self.history}{epoch:012d}"

    def order(self, instance_id: str) -> str:
        return f"{self.orders}{instance_id}"

    def request(self, request_id: str) -> str:
        if not request_id or "/" in request_id:
            raise ValueError(f"bad request id {request_id!r}")
        return f"{self.requests}{request_id}"

    def result(self, request_id: str) -> str:
        if not request_id or "/" in request_id:
            raise ValueError(f"bad request id {request_id!r}")
        return f"{self.results}{request_id}"

    def run(self, reqid: str) -> str:
        if not reqid or "/" in reqid:
            raise ValueError(f"bad run id {reqid!r}")
        return f"{self.runs}{reqid}"


class Backend(Protocol):
    """What the election, membership and run locks need from a coordination store."""

    kind: str  # "etcd" or "local"
    keys: ClusterKeys

    def lease_grant(self, ttl: int) -> Lease: ...

    def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; the TTL it now has, ``<= 0`` when it is gone."""
        ...

    def resign(self, lease_id: int) -> None:
        """Revoke the lease: leadership, membership and locks bound to it end at once."""
        ...

    def campaign(self, lease_id: int, instance_id: str) -> CampaignResult: ...

    def leader(self) -> LeaderInfo | None: ...

    def wait_leader_change(self, since_revision: int, timeout: float) -> bool:
        """True as soon as the leader key changes at or after ``since_revision``."""
        ...

    def fenced_commit(
        self, epoch: int, puts: Mapping[str, str | bytes], deletes: Sequence[str] = ()
    ) -> bool: ...

    def record_effect(
        self,
        epoch: int,
        effect: str,
        instance_id: str,
        detail: Mapping[str, Any] | None = None,
        puts: Mapping[str, str | bytes] | None = None,
        deletes: Sequence[str] = (),
    ) -> EffectRecord | None:
        """Commit ``puts``/``deletes`` plus an effect record under ``epoch``; None if fenced."""
        ...

    def record_effects(
        self, epoch: int, instance_id: str, items: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[EffectRecord] | None:
        """Commit one effect record per ``(effect, detail)`` of ``items`` in one transaction
        under ``epoch`` (all or none; in this order); None if fenced."""
        ...

    def effects(self) -> list[EffectRecord]: ...

    def claim_member(self, lease_id: int, member: MemberInfo) -> MemberClaim:
        """Create ``members/<id>`` bound to ``lease_id`` only if absent (never overwrite
        another lease's key); a key already bound to ``lease_id`` counts as held."""
        ...

    def update_member(self, lease_id: int, member: MemberInfo) -> bool:
        """Rewrite the member key only while it is bound to ``lease_id``."""
        ...

    def release_member(self, lease_id: int, instance_id: str) -> bool:
        """Delete the member key only while it is bound to ``lease_id``."""
        ...

    def members(self) -> list[MemberInfo]: ...

    def run_lock_acquire(
        self, pairs: Sequence[tuple[str, str]], token: str, owner: str, lease_id: int
    ) -> list[str]:
        """Take every host:script lock or none; returns the conflicting ``host:script``."""
        ...

    def run_lock_release(
        self, pairs: Sequence[tuple[str, str]], token: str, owner: str
    ) -> None: ...

    def run_locks_held(self) -> list[tuple[str, str]]: ...

    def get_value(self, key: str) -> bytes | None: ...

    def get_prefix(self, prefix: str) -> list[KeyValue]: ...

    def close(self) -> None: ...


def _lock_value(host: str, script: str, token: str, owner: str) -> str:
    return json.dumps({"host": host, "script": script, "token": token, "owner": owner})


class KVBackend:
    """:class:`Backend` logic over any :class:`Store`."""

    kind = "kv"
    LOCK_CHUNK = 100  # keys per transaction (etcd allows 128 operations by default)

    def __init__(self, store: Store, cluster_name: str = "ctrl-exec") -> None:
        self.store = store
        self.keys = ClusterKeys(cluster_name)

    # -- leases and leadership ---------------------------------------------------------------

    def lease_grant(self, ttl: int) -> Lease:
        lease_id, granted = self.store.lease_grant(ttl)
        return Lease(lease_id, granted)

    def keepalive(self, lease_id: int) -> int:
        return self.store.lease_keepalive(lease_id)

    def resign(self, lease_id: int) -> None:
        self.store.lease_revoke(lease_id)

    def campaign(self, lease_id: int, instance_id: str) -> CampaignResult:
        won, create_rev = self.store.txn_create_if_absent(self.keys.leader, instance_id, lease_id)
        if won:
            return CampaignResult(True, LeaderInfo(instance_id, create_rev, lease_id), create_rev)
        kv = self.store.get(self.keys.leader)
        if kv is None:  # gone again already: the caller campaigns once more
            return CampaignResult(False, None, 0)
        info = LeaderInfo(kv.value.decode(), kv.create_rev, kv.lease)
        return CampaignResult(False, info, kv.mod_rev)

    def leader(self) -> LeaderInfo | None:
        kv = self.store.get(self.keys.leader)
        return None if kv is None else LeaderInfo(kv.value.decode(), kv.create_rev, kv.lease)

    def wait_leader_change(self, since_revision: int, timeout: float) -> bool:
        return self.store.watch_once(self.keys.leader, timeout, since_revision) is not None

    # -- fencing -------------------------------------------------------------------------------

    def fenced_commit(
        self, epoch: int, puts: Mapping[str, str | bytes], deletes: Sequence[str] = ()
    ) -> bool:
        ok, _rev = self.store.txn_put_if_epoch(self.keys.leader, epoch, puts, deletes)
        return ok

    def record_effect(
        self,
        epoch: int,
        effect: str,
        instance_id: str,
        detail: Mapping[str, Any] | None = None,
        puts: Mapping[str, str | bytes] | None = None,
        deletes: Sequence[str] = (),
    ) -> EffectRecord | None:
        key = self.keys.effect(epoch)
        at = time.time()
        body = {
            "effect": effect,
            "epoch": epoch,
            "instance_id": instance_id,
            "at": at,
            "detail": dict(detail or {}),
        }
        writes: dict[str, str | bytes] = dict(puts or {})
        writes[key] = json.dumps(body, sort_keys=True)
        ok, rev = self.store.txn_put_if_epoch(self.keys.leader, epoch, writes, deletes)
        if not ok:
            return None
        return EffectRecord(key, effect, epoch, instance_id, rev, at, dict(detail or {}))

    MAX_EFFECTS = 100  # effect records per transaction (etcd allows 128 operations)

    def record_effects(
        self, epoch: int, instance_id: str, items: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[EffectRecord] | None:
        if not items:
            return []
        if len(items) > self.MAX_EFFECTS:
            raise ValueError(f"more than {self.MAX_EFFECTS} effects in one transaction")
        keys = self.keys.effect_batch(epoch, len(items))
        at = time.time()
        writes: dict[str, str | bytes] = {}
        for key, (effect, detail) in zip(keys, items, strict=True):
            writes[key] = json.dumps({"effect": effect, "epoch": epoch,
                                      "instance_id": instance_id, "at": at,
                                      "detail": dict(detail)}, sort_keys=True)  # fmt: skip
        ok, rev = self.store.txn_put_if_epoch(self.keys.leader, epoch, writes)
        if not ok:
            return None
        return [EffectRecord(key, effect, epoch, instance_id, rev, at, dict(detail))
                for key, (effect, detail) in zip(keys, items, strict=True)]  # fmt: skip

    def effects(self) -> list[EffectRecord]:
        out: list[EffectRecord] = []
        for kv in self.store.get_prefix(self.keys.effects):
            d = json.loads(kv.value)
            out.append(
                EffectRecord(
                    key=kv.key,
                    effect=str(d["effect"]),
                    epoch=int(d["epoch"]),
                    instance_id=str(d["instance_id"]),
                    revision=kv.mod_rev,
                    at=float(d.get("at", 0.0)),
                    detail=dict(d.get("detail") or {}),
                )
            )
        # one transaction's records share a revision; their keys keep their order
        return sorted(out, key=lambda e: (e.revision, e.key))

    # -- membership ----------------------------------------------------------------------------

    def claim_member(self, lease_id: int, member: MemberInfo) -> MemberClaim:
        key = self.keys.member(member.instance_id)
        for _ in range(3):
            created, kv = self.store.txn_create_or_get(key, member.to_json(), lease_id)
            if created:
                return MemberClaim(True, created=True)
            if kv is None:
                continue  # deleted in between: try again
            if kv.lease == lease_id and lease_id:
                return MemberClaim(True)
            try:
                holder = MemberInfo.from_json(kv.value)
            except (ValueError, KeyError, TypeError):
                holder = MemberInfo(member.instance_id)
            return MemberClaim(False, holder=holder, holder_lease=kv.lease)
        return MemberClaim(False, holder=MemberInfo(member.instance_id))

    def update_member(self, lease_id: int, member: MemberInfo) -> bool:
        key = self.keys.member(member.instance_id)
        return self.store.txn_put_if_lease(key, member.to_json(), lease_id)

    def release_member(self, lease_id: int, instance_id: str) -> bool:
        return self.store.txn_delete_if_lease(self.keys.member(instance_id), lease_id)

    def members(self) -> list[MemberInfo]:
        return [MemberInfo.from_json(kv.value) for kv in self.store.get_prefix(self.keys.members)]

    # -- run locks -----------------------------------------------------------------------------

    def run_lock_acquire(
        self, pairs: Sequence[tuple[str, str]], token: str, owner: str, lease_id: int
    ) -> list[str]:
        items = {self.keys.lock(h, s): _lock_value(h, s, token, owner) for h, s in pairs}
        names = {self.keys.lock(h, s): f"{h}:{s}" for h, s in pairs}
        keys = list(items)
        taken: dict[str, str | bytes] = {}
        for i in range(0, len(keys), self.LOCK_CHUNK):
            chunk = {k: items[k] for k in keys[i : i + self.LOCK_CHUNK]}
            conflicts = self.store.txn_create_all_if_absent(chunk, lease_id)
            if conflicts:
                # all or none: give back earlier chunks, then list every conflict
                if taken:
                    self.store.txn_delete_if_value(taken)
                rest = {k: items[k] for k in keys[i + self.LOCK_CHUNK :]}
                more = [k for k in rest if self.store.get(k) is not None]
                return [names[k] for k in conflicts + more]
            taken.update(chunk)
        return []

    def run_lock_release(self, pairs: Sequence[tuple[str, str]], token: str, owner: str) -> None:
        items: dict[str, str | bytes] = {
            self.keys.lock(h, s): _lock_value(h, s, token, owner) for h, s in pairs
        }
        self.store.txn_delete_if_value(items)

    def run_locks_held(self) -> list[tuple[str, str]]:
        held = []
        for kv in self.store.get_prefix(self.keys.locks):
            d = json.loads(kv.value)
            held.append((str(d["host"]), str(d["script"])))
        return sorted(held, key=lambda p: f"{p[0]}:{p[1]}")

    # -- plain keys (run metadata, switchover requests, the generation) ----------------------

    def get_value(self, key: str) -> bytes | None:
        kv = self.store.get(key)
        return None if kv is None else kv.value

    def get_kv(self, key: str) -> KeyValue | None:
        """The key with its revisions (None when absent)."""
        return self.store.get(key)

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        return self.store.get_prefix(prefix)

    def revision(self) -> int:
        """The store's current revision (watch from ``revision() + 1`` to miss nothing)."""
        return self.store.revision()

    def store_id(self) -> str:
        """The store's identity: etcd's cluster id, or the embedded store's; a rebuilt
        etcd (new, empty, or restored from a snapshot) has a new one."""
        return self.store.identity()

    def watch_key(
        self, key: str, timeout: float, start_revision: int | None = None
    ) -> WatchEvent | None:
        """The first change of ``key`` from ``start_revision`` on, or None after ``timeout``."""
        return self.store.watch_once(key, timeout, start_revision)

    def put_value(self, key: str, value: str | bytes, lease_id: int = 0) -> int:
        """Unfenced put (never for leader-only state); returns the revision."""
        return self.store.put(key, value, lease=lease_id or None)

    def delete_value(self, key: str) -> bool:
        return self.store.delete(key)

    def generation(self) -> int:
        """The published config generation (0 before any)."""
        raw = self.get_value(self.keys.generation)
        if not raw:
            return 0
        try:
            doc = json.loads(raw)
        except ValueError:
            return 0
        if isinstance(doc, dict) and isinstance(doc.get("body"), dict):
            doc = doc["body"]  # a sealed record (cluster.signing): shown, not trusted
        value = doc.get("generation", 0) if isinstance(doc, dict) else doc
        return int(value) if isinstance(value, int) else 0

    def close(self) -> None:
        self.store.close()


class EtcdBackend(KVBackend):
    """The backend on an etcd v3 cluster."""

    kind = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        cluster_name: str = "ctrl-exec",
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 1.0,
    ) -> None:
        from cluster.etcd import EtcdClient  # only here: the local backend needs no client library

        client = EtcdClient(
            endpoints, ca=ca, cert=cert, key=key, user=user, password=password,
            probe_key=ClusterKeys(cluster_name).prefix, timeout=timeout,
        )  # fmt: skip
        super().__init__(client, cluster_name)


class LocalBackend(KVBackend):
    """The embedded backend: ``flock`` and a small revisioned store in ``<state_dir>/cluster``.

    Alone on a host it is always the leader; two instances sharing a state dir elect one.
    """

    kind = "local"

    def __init__(self, state_dir: str | Path, *, cluster_name: str = "ctrl-exec") -> None:
        self.state_dir = Path(state_dir)
        super().__init__(LocalStore(self.state_dir / "cluster"), cluster_name)


def make_backend(
    *,
    etcd_endpoints: Sequence[str] | str,
    state_dir: str | Path,
    cluster_name: str = "ctrl-exec",
    etcd_cacert: str | None = None,
    etcd_cert: str | None = None,
    etcd_key: str | None = None,
    etcd_user: str | None = None,
    etcd_password: str | None = None,
    timeout: float = 1.0,
) -> KVBackend:
    """:class:`EtcdBackend` when endpoints are configured, else :class:`LocalBackend`.

    ``etcd_endpoints`` may be the comma-separated config value. ``etcd_user`` and
    ``etcd_password`` (the password itself: :func:`cluster.credentials.read_password_file`
    reads the file) are etcd's own authentication, with or without a client certificate.
    """
    if isinstance(etcd_endpoints, str):
        etcd_endpoints = [e.strip() for e in etcd_endpoints.split(",") if e.strip()]
    if etcd_endpoints:
        return EtcdBackend(
            etcd_endpoints,
            cluster_name=cluster_name,
            ca=etcd_cacert,
            cert=etcd_cert,
            key=etcd_key,
            user=etcd_user,
            password=etcd_password,
            timeout=timeout,
        )
    return LocalBackend(state_dir, cluster_name=cluster_name)
