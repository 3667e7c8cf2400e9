"""Follower side: fetch the files of a generation from a peer over mTLS and verify them.

The generation's publisher is asked first, then every member that applied it (the old
leader may be gone). A peer is asked only when its certificate carries one of the
cluster's dispatcher serials (:func:`dispatcher.ha.peer.connect_checked`: an agent
certificate behind a forged member record gets nothing). A file is accepted only when its
size and sha256 match the (verified) manifest.
"""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Callable

from cluster.backend import MemberInfo
from dispatcher.config import DispatcherConfig
from dispatcher.ha import peer
from dispatcher.ha.manifest import MAX_FILE, Entry, Generation
from dispatcher.ha.sync.state import SyncError

MembersFn = Callable[[bool], list[MemberInfo]]
Conns = dict[str, http.client.HTTPConnection]


class Fetcher:
    TIMEOUT = 10.0

    def __init__(self, cfg: DispatcherConfig, me: str, members: MembersFn,
                 allowed: Callable[[], set[str]]) -> None:  # fmt: skip
        self.cfg = cfg
        self.me = me
        self.members = members
        self.allowed = allowed  # the cluster's dispatcher serials

    def sources(self, g: Generation) -> list[MemberInfo]:
        """Who can serve ``g``: its publisher first, then members that applied it."""
        members = [m for m in self.members(True) if m.instance_id != self.me and m.advertise_url]
        first = [m for m in members if m.instance_id == g.leader]
        rest = sorted((m for m in members if m.instance_id != g.leader and m.generation == g.number),
                      key=lambda m: m.instance_id)  # fmt: skip
        return first + rest

    def fetch(
        self, sources: list[MemberInfo], conns: Conns, e: Entry, number: int
    ) -> tuple[bytes, str]:
        """``(content, instance_id)`` of file ``e`` of generation ``number``, verified."""
        errors: list[str] = []
        for m in sources:
            if not m.advertise_url.startswith("https://"):
                errors.append(f"{m.instance_id}: no TLS on {m.advertise_url}")
                continue
            data = self._fetch_from(m, conns, e, number, errors)
            if data is not None:
                return data, m.instance_id
        raise SyncError(f"cannot fetch {e.path} of generation {number}: {'; '.join(errors)}")

    def _fetch_from(
        self, m: MemberInfo, conns: Conns, e: Entry, number: int, errors: list[str]
    ) -> bytes | None:
        for attempt in (1, 2):  # a kept-alive connection may have been closed meanwhile
            conn = conns.get(m.instance_id)
            try:
                if conn is None:
                    conn = conns[m.instance_id] = peer.connect_checked(
                        self.cfg, m.advertise_url, self.TIMEOUT, self.allowed, "fetch"
                    )
                conn.request("GET", peer.file_url_path(m.advertise_url, e.path, number))
                resp = conn.getresponse()
                data = resp.read(MAX_FILE + 1)
            except peer.PeerRefused as exc:
                errors.append(f"{m.instance_id}: refused: {exc}")
                return None
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conns.pop(m.instance_id, None)
                if attempt == 2:
                    errors.append(f"{m.instance_id}: {type(exc).__name__}: {exc}")
                continue
            if resp.status != 200:
                errors.append(f"{m.instance_id}: HTTP {resp.status} {data[:200]!r}")
                return None
            if len(data) != e.size or hashlib.sha256(data).hexdigest() != e.sha256:
                errors.append(f"{m.instance_id}: {e.path} does not match the manifest")
                return None
            return data
        return None
