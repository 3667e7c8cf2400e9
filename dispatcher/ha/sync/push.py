"""The leader pushes a new generation's changed files to the followers (``sync_mode = push``).

Without it a follower learns of generation N from its etcd watch, reads the changed
manifest chunks from etcd, then fetches each changed file from the leader
(:mod:`~dispatcher.ha.sync.fetcher`): three round trips after the publish, on the path of
every acknowledged change (``sync_ack``). Right after the fenced transaction that
published N commits, the leader sends each live member, over the mTLS peer route
(``POST /cluster/files/``, the peer serial checked both ways as for fetching), one JSON
document: the sealed head exactly as stored, the manifest chunks it added and the changed
files (at most :attr:`Pusher.MAX_FILES_BYTES` of them; the rest are fetched).

Nothing is trusted more than a fetch: the follower applies the pushed head only when it
is byte for byte the head etcd holds now (one read) and its seal verifies with the cluster
key; a pushed chunk counts only when its sha256 is the one the sealed head names, a
pushed file only when its size and sha256 are the manifest's (the checks a fetched file
passes); the epoch guard refuses an older epoch as for a watched head. Whatever is missing
or refused is fetched as before, and a push that fails changes nothing: the watch still
brings the generation. No secret travels through etcd (the files go peer to peer).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from agent.common import logfmt
from cluster.backend import MemberInfo
from dispatcher.config import DispatcherConfig
from dispatcher.ha import peer
from dispatcher.ha.manifest import Generation

ev = logfmt.event
PUSH_PATH = "/cluster/files/"  # POST: a pushed generation (GET .../<path>: one file)


class PushRefused(ValueError):
    """A pushed generation was not applied (malformed, not etcd's head, refused)."""


@dataclass(frozen=True)
class Pushed:
    """A pushed generation, decoded (nothing in it verified yet)."""

    head: bytes
    rev: int
    chunks: dict[str, bytes]
    files: dict[str, bytes]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(head: bytes, rev: int, chunks: Mapping[str, bytes], files: Mapping[str, bytes]) -> bytes:
    return json.dumps({"head": _b64(head), "rev": rev,
                       "chunks": {s: _b64(d) for s, d in chunks.items()},
                       "files": {p: _b64(d) for p, d in files.items()}}).encode()  # fmt: skip


def decode(body: bytes) -> Pushed:
    """The pushed document, or :class:`PushRefused` naming what is wrong with it."""
    try:
        d = json.loads(body)
        if not isinstance(d, dict):
            raise PushRefused("a push is a JSON object")
        head, rev, chunks, files = d["head"], d["rev"], d.get("chunks", {}), d.get("files", {})
        if not (isinstance(head, str) and isinstance(rev, int) and not isinstance(rev, bool)
                and isinstance(chunks, dict) and isinstance(files, dict)):  # fmt: skip
            raise PushRefused("a push has head (base64), rev (int), chunks and files (objects)")
        if not all(isinstance(v, str) for v in (*chunks.values(), *files.values())):
            raise PushRefused("chunks and files are base64 strings")
        return Pushed(
            base64.b64decode(head, validate=True), rev,
            {str(k): base64.b64decode(v, validate=True) for k, v in chunks.items()},
            {str(k): base64.b64decode(v, validate=True) for k, v in files.items()},
        )  # fmt: skip
    except (ValueError, KeyError, binascii.Error) as exc:
        if isinstance(exc, PushRefused):
            raise
        raise PushRefused(f"malformed push: {type(exc).__name__}: {exc}") from None


class Pusher:
    """Leader side: send each live member a just-published generation, in the background
    (one worker per member, each on its own kept-alive connection); a member that does not
    answer is left to its watch and fetch."""

    TIMEOUT = 5.0
    MAX_FILES_BYTES = 512 * 1024  # file bytes per push (the API takes 1 MiB bodies)
    # a connection idle this long is closed: a member shutting down closes its side with
    # a TLS close_notify that an idle client never answers, and its server would wait
    # for that answer (its graceful-shutdown timeout) before it exits
    IDLE = 1.0

    def __init__(
        self,
        cfg: DispatcherConfig,
        me: str,
        members: Callable[[], list[MemberInfo]],
        allowed: Callable[[], set[str]],
    ) -> None:
        self.cfg = cfg
        self.me = me
        self.members = members  # live member records (as last read)
        self.allowed = allowed  # the cluster's dispatcher serials
        self._conns: dict[str, http.client.HTTPSConnection] = {}
        self._used: dict[str, float] = {}  # instance id -> when its connection was last used
        self._busy: set[str] = set()  # members a push is in flight to
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="ha-push")
        self.sent = 0  # pushes a member answered 200 to (tests, /metrics)
        # instance id -> the newest generation it answered a push with: applied, synced
        # and in its member record (:meth:`Syncer.receive_push`); ``sync_ack`` counts it
        self._confirmed: dict[str, int] = {}
        self._news = threading.Condition(self._lock)

    def push(self, g: Generation, head: bytes, rev: int, chunks: Mapping[str, bytes],
             files: Mapping[str, bytes]) -> int:  # fmt: skip
        """Queue ``g`` for every live member (not busy with an earlier push); how many."""
        budget, chosen = self.MAX_FILES_BYTES, {}
        for path, data in sorted(files.items(), key=lambda kv: len(kv[1])):
            if len(data) > budget:
                break
            chosen[path] = data
            budget -= len(data)
        body = encode(head, rev, chunks, chosen)
        queued = 0
        for m in self.members():
            if m.instance_id == self.me or not m.advertise_url.startswith("https://"):
                continue
            with self._lock:
                if m.instance_id in self._busy:  # it fetches what it misses
                    continue
                self._busy.add(m.instance_id)
            try:
                self._pool.submit(self._send, m, g.number, body)
            except RuntimeError:  # closed
                with self._lock:
                    self._busy.discard(m.instance_id)
                break
            queued += 1
        return queued

    def _send(self, m: MemberInfo, number: int, body: bytes) -> None:
        try:
            status, text = self._post(m, body)
        except Exception as exc:  # logged; the member's watch and fetch still bring it
            status, text = 0, f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._busy.discard(m.instance_id)
        if status == 200:
            self.sent += 1
            self._confirm(m.instance_id, text)
            return
        ev("sync-push", logging.INFO, to=m.instance_id, generation=number,
           result=f"HTTP {status}" if status else "failed", detail=text[:200])  # fmt: skip

    def _confirm(self, instance_id: str, text: str) -> None:
        try:
            generation = json.loads(text).get("generation")
        except (ValueError, AttributeError):
            return
        if not isinstance(generation, int) or isinstance(generation, bool):
            return
        with self._news:
            if generation > self._confirmed.get(instance_id, 0):
                self._confirmed[instance_id] = generation
            self._news.notify_all()

    def confirmed(self) -> dict[str, int]:
        """Instance id -> the newest generation it confirmed applying (answering a push)."""
        with self._lock:
            return dict(self._confirmed)

    def wait_confirmed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a member to confirm a push; True when one did."""
        with self._news:
            return self._news.wait(timeout)

    def forget(self) -> None:
        """Drop the confirmations (a new epoch counts only what it pushed itself)."""
        with self._lock:
            self._confirmed.clear()

    def _post(self, m: MemberInfo, body: bytes) -> tuple[int, str]:
        path = peer.base_path(m.advertise_url) + PUSH_PATH
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        for attempt in (1, 2):  # a kept-alive connection may have been closed meanwhile
            with self._lock:
                conn = self._conns.pop(m.instance_id, None)
            try:
                if conn is None:
                    conn = peer.connect_checked(self.cfg, m.advertise_url, self.TIMEOUT,
                                                self.allowed, "push")  # fmt: skip
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                text = resp.read(64 * 1024).decode(errors="replace")
            except peer.PeerRefused:
                raise
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                if attempt == 2:
                    raise
                continue
            with self._lock:
                old = self._conns.pop(m.instance_id, None)
                self._conns[m.instance_id] = conn
                self._used[m.instance_id] = time.monotonic()
            if old is not None:
                old.close()
            return resp.status, text
        return 0, "not sent"

    def reap(self, idle: float | None = None) -> int:
        """Close the connections idle for ``idle`` s (:attr:`IDLE`); how many."""
        limit = time.monotonic() - (self.IDLE if idle is None else idle)
        with self._lock:
            old = [i for i in self._conns if i not in self._busy and self._used.get(i, 0) < limit]
            conns = [self._conns.pop(i) for i in old]
        for c in conns:
            c.close()
        return len(conns)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for c in conns:
            c.close()
