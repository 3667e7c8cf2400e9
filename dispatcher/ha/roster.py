"""The roster: every instance the cluster is configured with, alive or not.

Member keys (``members/<id>``) live only as long as their instance's session, so a list made
from them drops an instance that is down at that moment. The load balancer's configuration
must name every instance (a down one is marked down by its health check, and taken back in
when it returns), so each instance also writes ``roster/<id>``: the addresses a load
balancer needs, not bound to a lease, sealed with the cluster key like every record the
instances act on (an etcd writer cannot add a backend). It is rewritten when it changes and
removed by ``ced cluster forget ID`` (the remove-instance runbook), never by a stop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cluster.backend import KVBackend, MemberInfo
from dispatcher.ha.records import Records

KIND = "roster"


@dataclass(frozen=True)
class Entry:
    instance_id: str
    advertise_url: str
    health_port: int = 0
    pairing_port: int = 0
    proxy_port: int = 0
    pairing_proxy_port: int = 0

    @classmethod
    def of(cls, m: MemberInfo) -> Entry:
        return cls(m.instance_id, m.advertise_url, m.health_port, m.pairing_port, m.proxy_port,
                   m.pairing_proxy_port)  # fmt: skip

    def member(self) -> MemberInfo:
        """As a (not live) :class:`MemberInfo`, for the load balancer's configuration."""
        return MemberInfo(instance_id=self.instance_id, advertise_url=self.advertise_url,
                          health_port=self.health_port, pairing_port=self.pairing_port,
                          proxy_port=self.proxy_port,
                          pairing_proxy_port=self.pairing_proxy_port)  # fmt: skip


def key(backend: KVBackend, instance_id: str) -> str:
    return f"{backend.keys.prefix}roster/{instance_id}"


def record(backend: KVBackend, records: Records, member: MemberInfo) -> bool:
    """Write this instance's entry if it is missing or different; True when written."""
    k = key(backend, member.instance_id)
    entry = asdict(Entry.of(member))
    raw = backend.get_value(k)
    current = records.open_dict(KIND, k, raw, tag="own") if raw is not None else None
    if current == entry:
        return False
    backend.put_value(k, records.seal(KIND, k, entry))
    return True


def read(backend: KVBackend, records: Records) -> list[Entry]:
    """Every sealed entry (a forged or unreadable one is logged once and left out)."""
    out = []
    for kv in backend.get_prefix(f"{backend.keys.prefix}roster/"):
        body = records.open_dict(KIND, kv.key, kv.value)
        if body is None:
            continue
        try:
            out.append(Entry(**{k: body[k] for k in Entry.__dataclass_fields__ if k in body}))
        except TypeError:
            continue
    return sorted(out, key=lambda e: e.instance_id)


def forget(backend: KVBackend, instance_id: str) -> bool:
    """Remove an instance from the roster (refused by the caller while it is live)."""
    return backend.delete_value(key(backend, instance_id))


def configured(backend: KVBackend, records: Records) -> list[MemberInfo]:
    """Live members, plus roster entries of instances that are down right now."""
    live = {m.instance_id: m for m in backend.members()}
    for e in read(backend, records):
        live.setdefault(e.instance_id, e.member())
    return sorted(live.values(), key=lambda m: m.instance_id)


__all__ = ["KIND", "Entry", "configured", "forget", "read", "record"]
