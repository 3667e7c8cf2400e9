"""Follower side: fetch the files of a generation from a peer over mTLS and verify them.

The generation's publisher is asked first, then every member that applied it (the old
leader may be gone). A peer is asked only when its certificate carries one of the
cluster's dispatcher serials (:func:`dispatcher.ha.peer.connect_checked`: an agent
certificate behind a forged member record gets nothing). A file is accepted only when its
size and sha256 match the (verified) manifest.

The client presents the dispatcher certificate; when a peer refuses it (403) and a kept
previous pair exists (``<cert>.prev``/``<key>.prev``), that pair is presented instead, then
a staged next pair (``.next``). An ex-leader killed in the middle of a rotation restarts
with a certificate no peer accepts: a new one the cluster never published (the kept old
one is the cluster's), or the old one after the new leader finished the rotation and
retired it (the staged next one is the cluster's). Either way it can still fetch the
published generation and converge to it.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import os
import threading
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
    WORKERS = 4  # files fetched at once, each lane on its own kept-alive connection

    def __init__(self, cfg: DispatcherConfig, me: str, members: MembersFn,
                 allowed: Callable[[], set[str]]) -> None:  # fmt: skip
        self.cfg = cfg
        self.me = me
        self.members = members
        self.allowed = allowed  # the cluster's dispatcher serials
        self.identity: dict[str, int] = {}  # instance id -> index in identities() that works
        self.conns: Conns = {}  # kept between generations (no TLS handshake per apply)
        self._lanes: list[Conns] = [self.conns]  # one set of connections per fetch lane
        self._lanes_lock = threading.Lock()
        # files of a generation the leader pushed (:mod:`~.push`): used instead of a
        # fetch when they pass the same check
        self._offered: tuple[int, dict[str, bytes]] = (0, {})

    def offer(self, number: int, files: dict[str, bytes]) -> None:
        """Files pushed for generation ``number`` (unverified: :meth:`fetch` checks them
        against the manifest as it checks a fetched file); ``offer(0, {})`` forgets them."""
        self._offered = (number, files)

    def lane(self, i: int) -> Conns:
        """The connections of fetch lane ``i`` (lane 0: :attr:`conns`), kept between
        generations; a lane is used by one thread at a time."""
        with self._lanes_lock:
            while len(self._lanes) <= i:
                self._lanes.append({})
            return self._lanes[i]

    def close(self) -> None:
        with self._lanes_lock:
            lanes = list(self._lanes)
        for conns in lanes:
            for c in list(conns.values()):
                c.close()
            conns.clear()

    def identities(self) -> list[DispatcherConfig]:
        """The config to connect with: the dispatcher pair, then the kept previous pair,
        then a staged next pair (an ex-leader killed after telling the agents, before its
        install, holds the cluster's new pair only there once the old one is retired)."""
        out = [self.cfg]
        for suffix in (".prev", ".next"):
            cert, key = f"{self.cfg.cert}{suffix}", f"{self.cfg.key}{suffix}"
            if self.cfg.cert and self.cfg.key and os.path.isfile(cert) and os.path.isfile(key):
                kept = copy.copy(self.cfg)
                kept.cert, kept.key = cert, key
                out.append(kept)
        return out

    def sources(self, g: Generation, fresh: bool = False) -> list[MemberInfo]:
        """Who can serve ``g``: its publisher first, then members that applied it (from
        the members last read unless ``fresh`` or the publisher is not among them)."""
        members = [m for m in self.members(fresh) if m.instance_id != self.me and m.advertise_url]
        if not fresh and not any(m.instance_id == g.leader for m in members):
            return self.sources(g, fresh=True)
        first = [m for m in members if m.instance_id == g.leader]
        rest = sorted((m for m in members if m.instance_id != g.leader and m.generation == g.number),
                      key=lambda m: m.instance_id)  # fmt: skip
        return first + rest

    def fetch(
        self, sources: list[MemberInfo], conns: Conns, e: Entry, number: int
    ) -> tuple[bytes, str]:
        """``(content, instance_id)`` of file ``e`` of generation ``number``, verified."""
        errors: list[str] = []
        offered_for, offered = self._offered
        data = offered.get(e.path) if offered_for == number else None
        if data is not None:
            if len(data) == e.size and hashlib.sha256(data).hexdigest() == e.sha256:
                return data, "push"
            errors.append(f"push: {e.path} does not match the manifest")
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
        ids = self.identities()
        attempt = 0
        while attempt < 2:  # a kept-alive connection may have been closed meanwhile
            attempt += 1
            which = min(self.identity.get(m.instance_id, 0), len(ids) - 1)
            conn = conns.get(m.instance_id)
            try:
                if conn is None:
                    conn = conns[m.instance_id] = peer.connect_checked(
                        ids[which], m.advertise_url, self.TIMEOUT, self.allowed, "fetch"
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
            if resp.status == 403 and which + 1 < len(ids):
                conn.close()  # refused: present the kept previous (then staged next) pair
                conns.pop(m.instance_id, None)
                self.identity[m.instance_id] = which + 1
                attempt = 0
                continue
            if resp.status != 200:
                self.identity.pop(m.instance_id, None)  # start again from the first pair
                conn.close()
                conns.pop(m.instance_id, None)
                errors.append(f"{m.instance_id}: HTTP {resp.status} {data[:200]!r}")
                return None
            if len(data) != e.size or hashlib.sha256(data).hexdigest() != e.sha256:
                errors.append(f"{m.instance_id}: {e.path} does not match the manifest")
                return None
            return data
        return None
