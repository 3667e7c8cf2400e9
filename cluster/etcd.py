"""etcd v3 client wrapper: the only module that imports ``etcd3gw`` and ``requests``.

It talks to the etcd grpc-gateway JSON API (``/v3/``, etcd >= 3.4) through ``etcd3gw``,
with its own :class:`requests.Session` (``trust_env = False``: an environment
``REQUESTS_CA_BUNDLE`` would otherwise silently replace the etcd CA), TLS client
certificates, short timeouts, and failover across every configured member: a call that
cannot reach one member is tried on the next one, once around the list. Repeating a call
over time is the caller's business (``cluster.retry``).

Every failure surfaces as :class:`EtcdUnavailable`. Writes are made safe to repeat on
another member: create-if-absent recognises its own lease, puts are idempotent, and
fenced transactions compare the epoch.

With ``user``/``password`` (etcd's own authentication; etcd3gw has none) the client
authenticates through the gateway (``POST /v3/auth/authenticate``) on first use and sends
the token in the ``Authorization`` header of every request (passed per request: the
shared session's headers are never changed while other threads use it). A token that lapsed (simple
tokens after 5 idle minutes) is renewed once per call (:func:`cluster.retry.reauth_call`).
Refused credentials, an etcd that wants credentials we do not have, and a role that does
not cover a key raise :class:`EtcdAccessDenied`, naming the endpoint and the user.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as gw_exc
from urllib3.exceptions import ReadTimeoutError

from cluster import retry
from cluster.errors import AccessDenied, BackendUnavailable
from cluster.store import KeyValue, WatchEvent
from cluster.watchstream import KeyStream

log = logging.getLogger("ctrl-exec.cluster")

T = TypeVar("T")

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


class EtcdUnavailable(BackendUnavailable):
    """etcd could not be reached, timed out or refused the request."""


class EtcdAccessDenied(EtcdUnavailable, AccessDenied):
    """etcd refused our credentials, wants some, or our role does not cover the key."""


class _TokenExpired(EtcdUnavailable):
    """etcd no longer knows our auth token (renewed once by :meth:`EtcdClient._call`)."""


def _etcd_error(exc: gw_exc.Etcd3Exception) -> str:
    """The ``error`` text of a gateway error answer (else the raw text)."""
    text = exc.detail_text or ""
    try:
        doc = json.loads(text)
    except ValueError:
        return text or repr(exc)
    if isinstance(doc, dict):
        return str(doc.get("error") or doc.get("message") or text)
    return text


def _session(ca: str | None, cert: str | None, key: str | None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # never let REQUESTS_CA_BUNDLE & co. replace the CA
    s.verify = ca if ca else True
    if cert and key:
        s.cert = (cert, key)
    return s


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _raw(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def _prefix_end(prefix: str) -> str:
    """The range end covering every key that starts with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return _b64(bytes(raw))
        raw.pop()
    return _b64(b"\0")


def _kv(item: Mapping[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(item["key"]).decode(),
        value=_unb64(item.get("value", "")),
        create_rev=int(item.get("create_revision", 0)),
        mod_rev=int(item.get("mod_revision", 0)),
        lease=int(item.get("lease", 0)),
    )


def _compare_create(key: str, revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": revision}


def _compare_lease(key: str, lease: int) -> dict[str, Any]:
    # a missing key compares as lease 0, so this fails for it
    return {"key": _b64(key), "result": "EQUAL", "target": "LEASE", "lease": lease}


def _put_op(key: str, value: str | bytes, lease: int | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


def _range_op(key: str) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def _delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def _cancel_reason(result: Mapping[str, Any]) -> str:
    """Why etcd canceled a watch (a compacted start revision comes without a reason)."""
    reason = str(result.get("cancel_reason", ""))
    compacted = result.get("compact_revision")
    if not reason and compacted not in (None, "", "0", 0):
        reason = f"the start revision is compacted (etcd keeps revisions from {compacted} on)"
    return reason


def _header_rev(resp: Mapping[str, Any]) -> int:
    return int(resp.get("header", {}).get("revision", 0))


class EtcdClient:
    """A small typed client over several etcd members (see the module docstring).

    ``endpoints`` are URLs such as ``https://10.0.0.1:2379``; with ``https``, ``ca`` is the
    etcd CA file and ``cert``/``key`` the client certificate. ``user``/``password`` are an
    etcd user's (both or neither; combinable with the certificate). ``probe_key`` is the
    key :meth:`revision` reads (one the user may read: under the cluster's prefix).
    ``timeout`` bounds every request (connect and read), so one dead member costs at most
    that much per call.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        user: str | None = None,
        password: str | None = None,
        probe_key: str = "\0",
        timeout: float = 1.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        if bool(user) != bool(password):
            raise ValueError("etcd user and password go together")
        self.user = user or None
        self._password = password or None
        self._token: str | None = None  # None: authenticate before the next call
        self.probe_key = probe_key  # read for the revision: a role may cover only a prefix
        self.timeout = timeout
        if bool(cert) != bool(key):
            raise ValueError("etcd client cert and key go together")
        self._session = _session(ca, cert, key)
        # Watches have their own pool: a watch ends only by closing its connection, so on
        # the shared pool each would cost the next request a new TCP+TLS handshake. Each
        # watched key keeps one long-lived watch (:class:`KeyStream`) on this pool.
        self._watch_session = _session(ca, cert, key)
        self._clients: list[etcd3gw.Etcd3Client] = []
        for url in endpoints:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"bad etcd endpoint {url!r}")
            self._clients.append(
                etcd3gw.Etcd3Client(
                    host=parts.hostname,
                    port=parts.port or 2379,
                    protocol=parts.scheme,
                    timeout=timeout,
                    api_path="/v3/",
                    session=self._session,
                )
            )
        self.endpoints = [c.base_url for c in self._clients]
        self._current = 0
        self._lock = threading.Lock()
        self._streams: dict[str, KeyStream] = {}  # key -> its long-lived watch
        self._streams_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[etcd3gw.Etcd3Client], T]) -> T:
        """Run ``fn`` on the current member, failing over once around the member list;
        with a user, renew a lapsed token once."""
        if self.user is None:
            return self._call_members(what, fn)
        return retry.reauth_call(
            lambda: self._call_members(what, fn),
            expired=lambda exc: isinstance(exc, _TokenExpired),
            renew=self._forget_token,
        )

    # -- authentication ----------------------------------------------------------------------

    def _forget_token(self) -> None:
        with self._lock:
            self._token = None

    def _auth_headers(self) -> dict[str, str]:
        """The ``Authorization`` header of the next request (per request: the session's
        own headers are never changed, other threads merge them while they send)."""
        token = self._token
        return {"Authorization": token} if token else {}

    def _ensure_token(self, client: etcd3gw.Etcd3Client) -> None:
        """Authenticate on ``client`` unless a token is held (no-op without a user)."""
        if self.user is None or self._token is not None:
            return
        try:
            resp = client.post(
                client.get_url("/auth/authenticate"),
                json={"name": self.user, "password": self._password},
            )
        except (gw_exc.ConnectionFailedError, gw_exc.ConnectionTimeoutError):
            raise
        except gw_exc.Etcd3Exception as exc:
            error = _etcd_error(exc)
            if "authentication is not enabled" in error:
                log.warning("etcd at %s has authentication off; etcd_user %r is not used",
                            client.base_url, self.user)  # fmt: skip
                token = ""
            elif "invalid user ID or password" in error or "authentication failed" in error:
                raise EtcdAccessDenied(
                    f"etcd at {client.base_url} refused user '{self.user}': {error} (check "
                    "etcd_user and etcd_password_file)"
                ) from None
            else:
                raise EtcdUnavailable(f"etcd authenticate on {client.base_url}: {error}") from exc
        else:
            token = str(resp.get("token", "")) if isinstance(resp, dict) else ""
            if not token:
                raise ValueError(f"etcd authenticate: no token in {resp!r}")
        with self._lock:
            self._token = token

    def _refusal(
        self, what: str, client: etcd3gw.Etcd3Client, error: str
    ) -> EtcdUnavailable | None:
        """The error for an auth refusal of a call (None: not an auth refusal)."""
        who = f"user '{self.user}'" if self.user else "no user (etcd_user is not set)"
        if "invalid auth token" in error:
            return _TokenExpired(f"etcd {what} on {client.base_url}: {error}")
        if "user name is empty" in error and self.user and self._token == "":
            # we skipped authentication while it was off: etcd has turned it on since
            return _TokenExpired(f"etcd {what} on {client.base_url}: {error}")
        if "user name is empty" in error or "user name not found" in error:
            return EtcdAccessDenied(
                f"etcd at {client.base_url} requires authentication and refused {what} by "
                f"{who}: {error} (set etcd_user and etcd_password_file)"
            )
        if "permission denied" in error:
            return EtcdAccessDenied(
                f"etcd at {client.base_url} refused {what} by {who}: {error} (its role must "
                "grant readwrite on the cluster prefix /<cluster_name>/)"
            )
        return None

    def _call_members(self, what: str, fn: Callable[[etcd3gw.Etcd3Client], T]) -> T:
        with self._lock:
            start = self._current
        n = len(self._clients)
        last: Exception | None = None
        for i in range(n):
            idx = (start + i) % n
            client = self._clients[idx]
            try:
                self._ensure_token(client)
                result = fn(client)
            except (gw_exc.ConnectionFailedError, gw_exc.ConnectionTimeoutError) as exc:
                last = exc
                log.debug("etcd %s on %s failed: %r", what, client.base_url, exc)
                continue
            except gw_exc.Etcd3Exception as exc:
                error = _etcd_error(exc)
                refusal = self._refusal(what, client, error)
                if refusal is not None:
                    raise refusal from None
                raise EtcdUnavailable(f"etcd {what}: {error}") from exc
            except (requests.RequestException, ValueError, KeyError) as exc:
                last = exc
                log.debug("etcd %s on %s failed: %r", what, client.base_url, exc)
                continue
            if idx != start:
                with self._lock:
                    self._current = idx
                log.info("etcd: failed over to %s", client.base_url)
            return result
        raise EtcdUnavailable(f"etcd {what}: no member answered ({last!r})")

    def _post(self, what: str, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        def go(c: etcd3gw.Etcd3Client) -> dict[str, Any]:
            resp = c.post(c.get_url(path), json=payload, headers=self._auth_headers())
            if not isinstance(resp, dict):
                raise ValueError(f"unexpected etcd answer {resp!r}")
            return resp

        return self._call(what, go)

    def _txn(
        self,
        what: str,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if len(success) > MAX_TXN_OPS or len(failure or []) > MAX_TXN_OPS:
            raise ValueError(f"transaction larger than {MAX_TXN_OPS} operations")
        return self._post(
            what, "/kv/txn", {"compare": compare, "success": success, "failure": failure or []}
        )

    def close(self) -> None:
        with self._streams_lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.close()
        self._session.close()
        self._watch_session.close()

    # -- leases ----------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease; returns ``(lease_id, granted_ttl)``."""
        resp = self._post("lease grant", "/lease/grant", {"TTL": int(ttl), "ID": 0})
        return int(resp["ID"]), int(resp["TTL"])

    def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease; returns the TTL it now has, ``<= 0`` when the lease is gone."""
        resp = self._post("lease keepalive", "/lease/keepalive", {"ID": lease_id})
        return int(resp.get("result", {}).get("TTL", -1))

    def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease (its keys go at once); a lease already gone is not an error."""
        try:
            self._post("lease revoke", "/kv/lease/revoke", {"ID": lease_id})
        except EtcdUnavailable as exc:
            if "lease not found" in str(exc):
                return
            raise

    # -- keys ------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        resp = self._post("get", "/kv/range", {"key": _b64(key)})
        kvs = resp.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        """Every key under ``prefix``, sorted by key."""
        resp = self._post(
            "get prefix", "/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
        )
        return sorted((_kv(i) for i in resp.get("kvs") or []), key=lambda kv: kv.key)

    def put(self, key: str, value: str | bytes, lease: int | None = None) -> int:
        """Write a key; returns the store revision of the write."""
        payload: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            payload["lease"] = lease
        return _header_rev(self._post("put", "/kv/put", payload))

    def delete(self, key: str) -> bool:
        resp = self._post("delete", "/kv/deleterange", {"key": _b64(key)})
        return int(resp.get("deleted", 0)) > 0

    def delete_prefix(self, prefix: str) -> int:
        resp = self._post(
            "delete prefix",
            "/kv/deleterange",
            {"key": _b64(prefix), "range_end": _prefix_end(prefix)},
        )
        return int(resp.get("deleted", 0))

    # -- transactions ------------------------------------------------------------------------

    def txn_create_if_absent(self, key: str, value: str | bytes, lease: int) -> tuple[bool, int]:
        """Create ``key`` bound to ``lease`` unless it exists.

        Returns ``(created, create_revision)``: the new key's create revision, or the
        existing key's. A key already bound to this very lease counts as created by us
        (a repeat after a lost answer).
        """
        resp = self._txn(
            "create-if-absent",
            [_compare_create(key, 0)],
            [_put_op(key, value, lease)],
            [_range_op(key)],
        )
        if resp.get("succeeded"):
            return True, _header_rev(resp)
        kvs = self._range_kvs(resp)
        if not kvs:  # deleted in between: report "not created", the caller tries again
            return False, 0
        existing = kvs[0]
        return existing.lease == lease and lease != 0, existing.create_rev

    def txn_create_all_if_absent(self, items: Mapping[str, str | bytes], lease: int) -> list[str]:
        """Create every key bound to ``lease``, or none; returns the keys already present."""
        if not items:
            return []
        keys = list(items)
        resp = self._txn(
            "create-all-if-absent",
            [_compare_create(k, 0) for k in keys],
            [_put_op(k, items[k], lease) for k in keys],
            [_range_op(k) for k in keys],
        )
        if resp.get("succeeded"):
            return []
        # The ranges ran atomically with the failed compare. Keys that hold our lease and
        # value are ours from a repeat after a lost answer (then all of them are).
        return [
            kv.key
            for kv in self._range_kvs(resp)
            if not (kv.lease == lease and kv.value == _raw(items[kv.key]))
        ]

    def txn_create_or_get(
        self, key: str, value: str | bytes, lease: int
    ) -> tuple[bool, KeyValue | None]:
        """Create ``key`` bound to ``lease`` unless it exists; else the key as it is.

        A key already bound to this very lease (a repeat after a lost answer) is returned
        as it is: the caller sees its own lease on it.
        """
        resp = self._txn(
            "create-or-get",
            [_compare_create(key, 0)],
            [_put_op(key, value, lease)],
            [_range_op(key)],
        )
        if resp.get("succeeded"):
            return True, None
        kvs = self._range_kvs(resp)
        return False, (kvs[0] if kvs else None)

    def txn_put_if_lease(self, key: str, value: str | bytes, lease: int) -> bool:
        if not lease:
            return False
        resp = self._txn("put-if-lease", [_compare_lease(key, lease)], [_put_op(key, value, lease)])
        return bool(resp.get("succeeded"))

    def txn_delete_if_lease(self, key: str, lease: int) -> bool:
        if not lease:
            return False
        resp = self._txn("delete-if-lease", [_compare_lease(key, lease)], [_delete_op(key)])
        return bool(resp.get("succeeded"))

    def txn_delete_if_value(self, items: Mapping[str, str | bytes]) -> None:
        """Delete each key whose value is still the given one (others are left alone)."""
        for key, value in items.items():
            self._txn(
                "delete-if-value",
                [{"key": _b64(key), "result": "EQUAL", "target": "VALUE", "value": _b64(value)}],
                [_delete_op(key)],
            )

    def txn_put_if_epoch(
        self,
        leader_key: str,
        epoch: int,
        puts: Mapping[str, str | bytes],
        deletes: Sequence[str] = (),
    ) -> tuple[bool, int]:
        """Apply ``puts`` and ``deletes`` only while ``leader_key``'s create revision is ``epoch``.

        Returns ``(applied, revision)``.
        """
        if epoch <= 0:
            return False, 0
        ops = [_put_op(k, v) for k, v in puts.items()] + [_delete_op(k) for k in deletes]
        resp = self._txn("fenced put", [_compare_create(leader_key, epoch)], ops)
        return bool(resp.get("succeeded")), _header_rev(resp)

    @staticmethod
    def _range_kvs(resp: Mapping[str, Any]) -> list[KeyValue]:
        out: list[KeyValue] = []
        for r in resp.get("responses") or []:
            for item in (r.get("response_range") or {}).get("kvs") or []:
                out.append(_kv(item))
        return out

    # -- watch -------------------------------------------------------------------------------

    def revision(self) -> int:
        """The store's current revision."""
        payload = {"key": _b64(self.probe_key), "limit": 1, "keys_only": True}
        return _header_rev(self._post("revision", "/kv/range", payload))

    def identity(self) -> str:
        """The etcd cluster's id (a rebuilt or restored etcd has a new one)."""
        payload = {"key": _b64(self.probe_key), "limit": 1, "keys_only": True}
        return str(self._post("identity", "/kv/range", payload).get("header", {}).get(
            "cluster_id", ""))  # fmt: skip

    def watch_once(
        self, key: str, timeout: float, start_revision: int | None = None
    ) -> WatchEvent | None:
        """The first change of ``key`` (from ``start_revision`` on), or None after ``timeout``:
        taken from the key's long-lived watch (:class:`~cluster.watchstream.KeyStream`), so
        successive waits share one connection and see each change as it commits."""
        deadline = time.monotonic() + timeout
        with self._streams_lock:
            stream = self._streams.get(key)
            if stream is None or not stream.serves(start_revision):
                if stream is not None:
                    stream.close()
                stream = KeyStream(key, start_revision, functools.partial(self._watch_events, key))
                self._streams[key] = stream
        return stream.next(start_revision, deadline)

    def _watch_events(
        self,
        key: str,
        resume: int | None,
        on_created: Callable[[int], None],
        stop: threading.Event,
        quiet: float,
    ) -> Iterator[WatchEvent]:
        """The events of a watch of ``key`` from ``resume`` on one member (failing over
        once around the list, renewing a lapsed token once), until the stream is quiet for
        ``quiet`` s or ``stop`` is set (returns: the caller opens it again from the
        revision after the last event), or fails (raises)."""
        create: dict[str, Any] = {"key": _b64(key)}
        if resume:
            create["start_revision"] = resume

        def created(revision: int) -> None:  # a watch from now, opened again: from then on
            create.setdefault("start_revision", revision + 1)
            on_created(revision)

        with self._lock:
            start = self._current
        n = len(self._clients)
        last: Exception | None = None
        for i in range(n):
            client = self._clients[(start + i) % n]
            delivered = False
            try:
                opened = self._watch_open(client, create, quiet)
                for event in self._watch_stream(client, opened, created, stop):
                    delivered = True
                    yield event
                return
            except _TokenExpired:  # lapsed while the stream was open: opened again
                self._forget_token()
                if delivered:
                    return
                raise
            except (gw_exc.ConnectionFailedError, gw_exc.ConnectionTimeoutError,
                    requests.RequestException, ValueError, KeyError) as exc:  # fmt: skip
                if delivered:
                    return  # opened again from the revision after the last event delivered
                last = exc
                log.debug("etcd watch on %s failed: %r", client.base_url, exc)
        raise EtcdUnavailable(f"etcd watch: no member answered ({last!r})")

    def _watch_open(
        self, client: etcd3gw.Etcd3Client, create: Mapping[str, Any], quiet: float
    ) -> tuple[requests.Response, Iterator[bytes], bytes]:
        """The watch opened on ``client``: the response, its chunks and the first message
        (etcd's answer to the create: created, or canceled with the reason, such as a
        lapsed auth token, renewed once here)."""

        def post() -> tuple[requests.Response, Iterator[bytes], bytes]:
            self._ensure_token(client)
            resp = self._watch_session.post(
                client.get_url("/watch"),
                json={"create_request": create},
                headers=self._auth_headers(),
                stream=True,
                timeout=(self.timeout, quiet),
            )
            try:
                if resp.status_code != 200:
                    error = _etcd_error(gw_exc.Etcd3Exception(resp.text))
                    refusal = self._refusal("watch", client, error)
                    if refusal is not None:
                        raise refusal
                    raise ValueError(f"watch answered HTTP {resp.status_code}: {error}")
                chunks = resp.iter_content(chunk_size=None)
                buf = b""
                while b"\n" not in buf:
                    buf += next(chunks)  # StopIteration: closed before it answered
                self._watch_result(client, buf.split(b"\n", 1)[0])  # raises if canceled
            except BaseException:
                resp.close()
                raise
            return resp, chunks, buf

        try:
            if self.user is None:
                return post()
            return retry.reauth_call(
                post, expired=lambda exc: isinstance(exc, _TokenExpired), renew=self._forget_token
            )
        except StopIteration:
            raise ValueError("the watch stream closed before etcd answered") from None

    def _watch_stream(
        self,
        client: etcd3gw.Etcd3Client,
        opened: tuple[requests.Response, Iterator[bytes], bytes],
        on_created: Callable[[int], None],
        stop: threading.Event,
    ) -> Iterator[WatchEvent]:
        """The events of the open stream until it is quiet (its read timeout) or ``stop``
        is set."""
        resp, chunks, buf = opened
        try:
            try:
                while True:
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            yield from self._watch_message(client, line, on_created)
                    if stop.is_set():
                        return
                    chunk = next(chunks, None)
                    if chunk is None:
                        raise ValueError("the watch stream ended")
                    buf += chunk
            except requests.ConnectionError as exc:
                if exc.args and isinstance(exc.args[0], ReadTimeoutError):
                    return  # quiet: opened again (a dead socket never errs by itself)
                raise
        finally:
            resp.close()

    def _watch_result(self, client: etcd3gw.Etcd3Client, line: bytes) -> dict[str, Any]:
        """The ``result`` of one message of a watch stream; raises when etcd canceled the
        watch (an auth refusal as :meth:`_refusal` names it, else ValueError)."""
        result = json.loads(line).get("result", {})
        if result.get("canceled"):
            reason = _cancel_reason(result)
            refusal = self._refusal("watch", client, reason)
            if refusal is not None:
                raise refusal
            raise ValueError(f"watch canceled: {reason}")
        return dict(result)

    def _watch_message(
        self, client: etcd3gw.Etcd3Client, line: bytes, on_created: Callable[[int], None]
    ) -> Iterator[WatchEvent]:
        result = self._watch_result(client, line)
        if result.get("created"):
            on_created(_header_rev(result))
        for ev in result.get("events") or []:
            kv = _kv(ev["kv"])
            yield WatchEvent(
                kind="DELETE" if ev.get("type") == "DELETE" else "PUT",
                key=kv.key,
                value=kv.value,
                mod_rev=kv.mod_rev,
            )
