"""The pairing listener on port 7444 (spec 5.2): server-auth TLS, two responses.

One asyncio task per connection, so a slow or silent client never holds up another:
the TLS handshake and the request read have deadlines, and waiting for an operator's
decision is a poll of the queue directory (every ``poll_interval`` seconds; upstream
polls every 2 s).

Per connection: per-IP volume limit (before the handshake), TLS handshake (no client
certificate requested), head up to ``\\r\\n\\r\\n`` (method and path are not checked), body
up to 64 KiB, JSON with ``csr`` and ``hostname``, hint validation, queue, response #1
``{"status":"pending","reqid":...}``, then the decision file verbatim as response #2, or
``{"status":"denied","reason":"approval timeout"}``. Every response is HTTP 200.

Beyond upstream: when the agent closes its connection before a decision, its request is
withdrawn from the queue (nobody could receive the certificate) unless the agent is back
on another connection; when the listener is stopped, waiting agents get
``{"status":"denied","reason":"pairing mode stopped"}``. Our agent reconnects when its
connection drops (an upstream agent does not) and sends the same request again: it is
answered as the same request (:func:`dispatcher.pairing.queue.submit`, ``resumed``):
``pending`` with the same reqid, then the decision; an approval made by a leader that has
died since is delivered from the approvals kept in ``ca_dir``.

Fault injection for tests: while the file named by ``CTRL_EXEC_TEST_HOLD_PAIRING_DELIVERY``
exists, no approval is delivered (the decision is kept, the connection stays open).

Trust boundaries (beyond upstream, same framing): the name must be an RFC 1123 host name
and the CSR's CN exactly that name; one client address holds at most
``pairing_max_per_source`` pending requests; a key or code already pending is refused
(:func:`dispatcher.pairing.queue.submit`). The rate limiter and the per-source cap are
keyed on the *client* address :meth:`PairingServer.handle` is given: the TCP peer, or on
the PROXY v2 port (``pairing_proxy_port``, for HAProxy's ``send-proxy-v2``) the client
address from the header. That port takes connections only from ``api_proxy_sources`` (the
API's rule, :mod:`dispatcher.proxyv2`): anyone else is closed before a byte is read, and
a missing, malformed or slow header closes the connection before TLS. The TLS
certificate message carries the CA after the dispatcher certificate, so an agent that pins
the CA (``request-pairing --ca-fingerprint``) can check the chain before it sends anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.common.logfmt import event
from agent.common.ratelimit import RateLimiter, RateSpec
from agent.common.tlsconf import server_context
from agent.common.wire import dumps, response_bytes
from dispatcher import proxyv2
from dispatcher.client.aio import ASYNCIO
from dispatcher.config import DispatcherConfig
from dispatcher.errors import LeaderOnlyRefused
from dispatcher.netaddr import plain_ip
from dispatcher.pairing import queue as pq
from dispatcher.pairing import tokengate
from dispatcher.registry import Registry
from dispatcher.statewrite import StateWriter, default_writer

MAX_BODY = 65_536
MAX_HEAD = 65_536
DEFAULT_VOLUME = RateSpec(10, 60, 300)
HOLD_ENV = "CTRL_EXEC_TEST_HOLD_PAIRING_DELIVERY"
UNAVAILABLE = "pairing unavailable, try again later"

OnRequest = Callable[[dict[str, Any]], None]
T = TypeVar("T")


def parse_rate(value: str) -> RateSpec:
    """``limit/window/block`` (seconds); raises ValueError when malformed."""
    parts = [p.strip() for p in value.split("/")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"rate limit must be limit/window/block, got {value!r}")
    a, b, c = (int(p) for p in parts)
    return RateSpec(a, b, c)


def frame(body: bytes) -> bytes:
    """HTTP/1.0 200 framing around raw JSON bytes, as :func:`agent.common.wire.response_bytes`."""
    head = (
        f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _context_with_ca(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The pairing listener's TLS context: the dispatcher cert followed by the CA cert in
    the handshake (an upstream agent ignores the extra certificate; ours can check a
    pinned CA before it sends its request). Without a readable CA: the cert alone."""
    import os
    import tempfile

    try:
        leaf = Path(cert).read_text()
        ca_pem = Path(ca).read_text() if ca else ""
    except (OSError, UnicodeDecodeError):
        return server_context(cert, key)
    if not ca_pem.strip() or ca_pem.strip() in leaf:
        return server_context(cert, key)
    with tempfile.TemporaryDirectory(prefix="ctrl-exec-pairing-") as tmp:
        chain = os.path.join(tmp, "chain.pem")  # public certificates only
        Path(chain).write_text(leaf.rstrip("\n") + "\n" + ca_pem)
        return server_context(chain, key)


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.close()


def _reverse_dns(ip: str) -> tuple[str, bool]:
    """Forward-confirmed reverse DNS: ``(name, confirmed)``; ``("", False)`` when none."""
    try:
        name = socket.gethostbyaddr(ip)[0]
    except (OSError, UnicodeError):
        return "", False
    try:
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return name, False
    return name, any(plain_ip(str(i[4][0]), keep_zone=True) == ip for i in infos)


class _Reject(Exception):
    def __init__(self, reason: str, log_reason: str = "", unread: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_reason = log_reason
        self.unread = unread


class PairingServer:
    """The 7444 listener. ``await start()``, later ``await stop()``.

    ``on_request(record)`` is called (in the event loop) with each newly queued record
    after the agent has its ``pending`` answer, so an interactive CLI can prompt.
    """

    def __init__(
        self,
        cfg: DispatcherConfig,
        *,
        host: str | None = None,
        port: int | None = None,
        approval_timeout: float = 600.0,
        poll_interval: float = 0.5,
        handshake_timeout: float = 10.0,
        read_timeout: float = 30.0,
        reverse_dns_timeout: float = 2.0,
        reverse_dns: bool = True,
        on_request: OnRequest | None = None,
        writer: StateWriter | None = None,
    ) -> None:
        self.cfg = cfg
        self.host = host if host is not None else cfg.pairing_bind
        self.port = port if port is not None else cfg.pairing_port
        self.approval_timeout = approval_timeout
        self.poll_interval = poll_interval
        self.handshake_timeout = handshake_timeout
        self.read_timeout = read_timeout
        self.reverse_dns_timeout = reverse_dns_timeout
        self.reverse_dns = reverse_dns
        self.on_request = on_request
        self.writer = writer or default_writer()
        self.pairing_dir = cfg.pairing_dir
        try:
            volume = parse_rate(cfg.pairing_rate_limit_volume)
        except ValueError as exc:
            event("config-warn", logging.WARNING, reason=f"pairing_rate_limit_volume: {exc}")
            volume = DEFAULT_VOLUME
        self.limiter = RateLimiter(
            volume, RateSpec(0, 0, 0), disabled=cfg.pairing_rate_limit_disable,
            on_event=lambda action, ip, reason: event(action, logging.WARNING, ip=ip,
                                                      reason=reason),
        )  # fmt: skip
        self.ssl_ctx: ssl.SSLContext | None = None
        self.server: asyncio.Server | None = None
        self.proxy_port = 0  # the PROXY v2 listener's port once started (0: none)
        self._proxy_sock: socket.socket | None = None
        self._proxy_accept: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Event | None = None
        self._attached: dict[str, int] = {}  # reqid -> connections waiting for it
        self.tokens = tokengate.TokenGate(cfg, self.writer)
        self._claims: dict[str, tokengate.Claimed] = {}  # reqid -> token outcome to settle

    @property
    def live(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        """Load the dispatcher cert/key, expire stale requests and listen."""
        self.ssl_ctx = _context_with_ca(self.cfg.cert, self.cfg.key, self.cfg.ca)
        self._stopping = asyncio.Event()
        await asyncio.to_thread(pq._dir, self.pairing_dir)
        await self._offload(lambda: pq.expire_stale(self.pairing_dir, writer=self.writer))
        self.server = await asyncio.start_server(
            self._on_connect, host=self.host, port=self.port, backlog=128,
            limit=MAX_HEAD + 1024,
        )  # fmt: skip
        sock = self.server.sockets[0]
        self.port = int(sock.getsockname()[1])
        if self.cfg.pairing_proxy_port:
            try:
                await self._start_proxy()
            except BaseException:
                self.server.close()
                self.server = None
                raise
        event("pairing-mode-start", port=self.port, bind=self.host,
              proxy_port=self.proxy_port or None)  # fmt: skip

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening; waiting agents get a final answer, then connections close."""
        if self.server is None:
            return
        assert self._stopping is not None
        self._stopping.set()
        self.server.close()
        await self._stop_proxy()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)
        self.server = None
        event("pairing-mode-stop", port=self.port)

    # ----- the PROXY v2 listener -----------------------------------------------------------

    async def _start_proxy(self) -> None:
        networks = proxyv2.parse_sources(self.cfg.api_proxy_sources)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.cfg.pairing_proxy_port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._proxy_sock = sock
        self.proxy_port = int(sock.getsockname()[1])
        self._proxy_accept = asyncio.create_task(self._proxy_loop(sock, networks))

    async def _stop_proxy(self) -> None:
        task, self._proxy_accept = self._proxy_accept, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock, self._proxy_sock = self._proxy_sock, None
        if sock is not None:
            sock.close()

    async def _proxy_loop(self, sock: socket.socket, networks: list[proxyv2.Network]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and friends: do not spin
                event("pairing-proxy-error", logging.ERROR, error=exc)
                await asyncio.sleep(0.1)
                continue
            peer = plain_ip(str(addr[0]), keep_zone=True)
            if not proxyv2.trusted(peer, networks):
                event("pairing-proxy-refuse", logging.WARNING, peer=peer,
                      reason="not-a-trusted-proxy")  # fmt: skip
                _close(conn)
                continue
            task = asyncio.create_task(self._proxied(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _proxied(self, conn: socket.socket, peer: str) -> None:
        """Read the PROXY v2 header off the raw socket (nothing after it), then serve the
        connection as the client the header names."""
        conn.setblocking(False)
        try:
            header = await asyncio.wait_for(proxyv2.read_header(conn), self.handshake_timeout)
        except (proxyv2.ProxyProtocolError, TimeoutError, OSError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            event("pairing-proxy-reject", logging.WARNING, peer=peer, reason=reason)
            _close(conn)
            return
        except asyncio.CancelledError:
            _close(conn)
            raise
        client = header.client[0] if header.client is not None else peer
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD + 1024, loop=loop)
        served: list[asyncio.Future[None]] = []

        def connected(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            served.append(asyncio.ensure_future(self.handle(r, w, client_ip=client)))

        try:
            await loop.connect_accepted_socket(
                lambda: asyncio.StreamReaderProtocol(reader, connected, loop=loop), conn
            )
        except OSError:
            _close(conn)
            return
        if served:
            await served[0]

    # ----- connections ------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.handle(reader, writer)

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        client_ip: str | None = None,
    ) -> None:  # fmt: skip
        """Serve one connection. ``client_ip`` is the real client address (a PROXY header's
        source behind a load balancer); the rate limiter, the per-source cap, the queued
        ``source_ip`` and the log lines use it. Default: the TCP peer."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        if client_ip is None:
            peername = writer.get_extra_info("peername") or ("", 0)
            client_ip = str(peername[0])
        ip = plain_ip(client_ip, keep_zone=True)
        try:
            if self.limiter.blocked(ip) or self.limiter.record_connection(ip):
                return
            await self._connection(reader, writer, ip)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one connection never takes the listener down
            event("pair-error", logging.ERROR, ip=ip, reason=f"{exc.__class__.__name__}: {exc}")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        writer.write(data)
        try:
            await asyncio.wait_for(writer.drain(), 30)
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError):
            return False
        return True

    @staticmethod
    async def _discard(reader: asyncio.StreamReader, n: int, limit: int = 4 << 20) -> None:
        """Read what the client is still sending, so closing does not reset the answer."""
        left = min(n, limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        with contextlib.suppress(Exception):
            while left > 0 and loop.time() < deadline:
                chunk = await asyncio.wait_for(reader.read(min(left, 65536)), 2.0)
                if not chunk:
                    break
                left -= len(chunk)

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str
    ) -> None:
        assert self.ssl_ctx is not None
        try:
            await writer.start_tls(self.ssl_ctx, ssl_handshake_timeout=self.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            event("tls-failure", logging.WARNING, peer=ip, reason=reason)
            return
        try:
            record = await asyncio.wait_for(self._read_and_queue(reader, ip), self.read_timeout)
        except _Reject as rej:
            event("pair-reject", logging.WARNING, ip=ip,
                  reason=rej.log_reason or rej.reason.replace(" ", "-"))  # fmt: skip
            await self._send(writer, response_bytes(200, {"status": "error",
                                                          "reason": rej.reason}))  # fmt: skip
            await self._discard(reader, rej.unread)
            return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return
        reqid = str(record["id"])
        resumed = str(record.get("resumed") or "")
        fields: dict[str, Any] = {"agent": record["hostname"], "ip": ip, "reqid": reqid,
                                  "status": "pending", "code": record["code"]}  # fmt: skip
        if record["ip"] != ip:
            fields["reported_ip"] = record["ip"]
        if resumed:
            fields["resumed"] = resumed
        event("pair-request", **fields)
        if resumed == "approved":
            await self._resume_approved(reader, writer, record)
            return
        self._attached[reqid] = self._attached.get(reqid, 0) + 1
        try:
            claim = self._claims.pop(reqid, None)
            if not await self._send(writer, response_bytes(200, {"status": "pending",
                                                                  "reqid": reqid})):  # fmt: skip
                await self._withdraw(reqid, "disconnected")
                if claim is not None:
                    await self._offload(lambda: self.tokens.release(claim, reqid))
                return
            if claim is not None:  # approved now, or why not logged
                await self._offload(lambda: self.tokens.settle(claim, record))
            if self.on_request is not None and not resumed and (claim is None or not claim.ok):
                await self._show(record)
            await self._await_decision(reader, writer, record)
        finally:
            left = self._attached.get(reqid, 1) - 1
            if left > 0:
                self._attached[reqid] = left
            else:
                self._attached.pop(reqid, None)

    def _kept_approval(self, record: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return pq.resumed_approval(pq.approvals_dir(self.cfg), pq.key_of(record),
                                       str(record.get("csr", "")), record.get("nonce"))  # fmt: skip
        except pq.Refused:
            return None

    async def _resume_approved(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        record: dict[str, Any], answered: bool = False,
    ) -> None:  # fmt: skip
        """A resubmitted request that was approved (maybe by a leader gone since):
        ``pending`` with its reqid (unless ``answered``), then the kept approval."""
        reqid = str(record["id"])
        if not answered and not await self._send(
            writer, response_bytes(200, {"status": "pending", "reqid": reqid})
        ):
            return
        if not await self._hold(reader):
            return
        sent = await self._send(writer, frame(dumps(record["approval"])))
        with contextlib.suppress(pq.PairingQueueError):
            qpath, apath, _ = pq.paths(self.pairing_dir, reqid)
            if await asyncio.to_thread(apath.exists):  # approved here, not delivered yet
                await self._delete(apath, qpath)
        event("pair-deliver", logging.INFO if sent else logging.WARNING, reqid=reqid,
              status="approved", sent=int(sent), resumed="approved")  # fmt: skip

    async def _hold(self, reader: asyncio.StreamReader) -> bool:
        """Test fault injection (``HOLD_ENV``): wait while the hold file exists; False
        when the agent hung up or the listener stops meanwhile."""
        hold = os.environ.get(HOLD_ENV, "")
        if not hold or not os.path.exists(hold):
            return True
        assert self._stopping is not None
        event("pair-hold", logging.WARNING, reason=f"{HOLD_ENV} exists")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.approval_timeout
        while os.path.exists(hold):
            if self._stopping.is_set() or reader.at_eof() or loop.time() > deadline:
                return False
            await asyncio.sleep(self.poll_interval)
        return True

    async def _show(self, record: dict[str, Any]) -> None:
        assert self.on_request is not None
        try:
            registry = Registry(self.cfg.registry_dir)
            shown = await asyncio.to_thread(pq.describe, [record], registry)
            self.on_request(shown[0])
        except Exception as exc:
            event("pair-error", logging.ERROR, reqid=str(record["id"]),
                  reason=f"on_request: {exc}")  # fmt: skip

    async def _read_and_queue(self, reader: asyncio.StreamReader, ip: str) -> dict[str, Any]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _Reject("request too large", "header-too-large", unread=MAX_HEAD) from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise
            raise _Reject("invalid request", "invalid-request") from None
        length: int | None = None
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise _Reject("invalid request", "invalid-request") from None
        if length is not None and length > MAX_BODY:
            raise _Reject("request too large", "body-too-large", unread=length)
        if not length or length < 0:
            raise _Reject("invalid request", "invalid-request")
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise _Reject("invalid request", "invalid-request") from None
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _Reject("invalid request", "invalid-request") from None
        if not isinstance(obj, dict) or not obj.get("csr") or not obj.get("hostname"):
            raise _Reject("invalid request", "invalid-request")
        csr, hostname = obj["csr"], obj["hostname"]
        if not isinstance(csr, str):
            raise _Reject("invalid request", "invalid-request")
        if not pq.valid_agent_name(hostname):
            raise _Reject("invalid hostname", "invalid-hostname")
        nonce = obj.get("nonce", "")
        if isinstance(nonce, dict | list):
            nonce = ""
        reported_ip = obj.get("ip") if pq.valid_ip(obj.get("ip")) else None
        lookup_by = obj.get("lookup_by") if obj.get("lookup_by") in pq.LOOKUP_BY else None
        rdns, confirmed = await self._rdns(ip)
        rid = pq.new_reqid()
        claim: tokengate.Claimed | None = None
        if obj.get(tokengate.FIELD) is not None:  # upstream agents send no token
            token = obj[tokengate.FIELD]
            claim = await self._offload(
                lambda: self.tokens.claim(token, reqid=rid, hostname=hostname, source_ip=ip),
                undo=lambda c: self.tokens.release(c, rid),
            )  # fmt: skip
        claimed = claim is not None and claim.ok
        try:
            # a request with a claimed token is not held to the queue's caps: the token
            # bounds it (each token approves one request, once)
            record = await self._offload(
                lambda: pq.submit(
                    self.pairing_dir, hostname=hostname, csr=csr, nonce=nonce, source_ip=ip,
                    ip=reported_ip, lookup_by=lookup_by, port=pq.valid_port(obj.get("port")),
                    reverse_dns=rdns, reverse_confirmed=confirmed,
                    max_queue=tokengate.NO_CAP if claimed else self.cfg.pairing_max_queue,
                    max_per_source=0 if claimed else self.cfg.pairing_max_per_source,
                    writer=self.writer, approvals=pq.approvals_dir(self.cfg), reqid=rid,
                ),
                undo=lambda rec: self._withdraw_claimed(str(rec["id"]), claim),
            )  # fmt: skip
        except (pq.QueueFull, pq.Refused, LeaderOnlyRefused) as exc:
            if claim is not None:
                await self._offload(lambda: self.tokens.release(claim, rid))
            if isinstance(exc, pq.QueueFull):
                raise _Reject("pairing queue full", "queue-full") from None
            if isinstance(exc, pq.Refused):
                raise _Reject(exc.reason, exc.log_reason) from None
            # not the leader any more, or etcd unreachable
            raise _Reject(UNAVAILABLE, f"not-queued: {exc}") from None
        if claim is not None:
            if record.get("resumed"):  # the same request again: its token is its own
                await self._offload(lambda: self.tokens.release(claim, rid))
            else:  # settled once the agent has its pending answer (no read timeout then)
                self._claims[rid] = claim
        return record

    async def _rdns(self, ip: str) -> tuple[str, bool]:
        if not self.reverse_dns:
            return "", False
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(None, _reverse_dns, ip), self.reverse_dns_timeout
            )
        except (TimeoutError, OSError):
            return "", False

    @staticmethod
    async def _offload(fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        """Queue work off the event loop: every queue write goes through the state writer,
        which in a cluster commits to etcd first (a slow or frozen etcd must not stall the
        other connections). The work runs to its end; a cancelled caller's result goes to
        ``undo`` (a request queued for a connection that is gone is withdrawn)."""
        return await ASYNCIO.offload(fn, undo)

    async def _delete(self, *paths: Path) -> None:
        def go() -> None:
            for p in paths:
                self.writer.delete(p)

        await self._offload(go)

    async def _withdraw(self, reqid: str, reason: str) -> None:
        if self._attached.get(reqid, 0) > 1:  # the agent is back on another connection
            event("pair-reattach", reqid=reqid, reason=reason)
            return
        await self._offload(lambda: self._withdraw_now(reqid, reason))

    def _withdraw_claimed(self, reqid: str, claim: tokengate.Claimed | None) -> None:
        """A request queued for a connection that is gone: withdrawn, its token released."""
        self._withdraw_now(reqid, "cancelled")
        if claim is not None:
            self.tokens.release(claim, reqid)

    def _withdraw_now(self, reqid: str, reason: str) -> None:
        """Drop an undecided request whose agent is gone (blocking: the state writer)."""
        decided = pq.withdraw(self.pairing_dir, reqid, self.writer)
        event("pair-abandon", logging.WARNING, reqid=reqid, reason=reason,
              decided=int(decided))  # fmt: skip

    async def _await_decision(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        record: dict[str, Any],
    ) -> None:  # fmt: skip
        reqid = str(record["id"])
        assert self._stopping is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.approval_timeout
        eof = asyncio.ensure_future(reader.read(1))
        stop = asyncio.ensure_future(self._stopping.wait())
        qpath, apath, dpath = pq.paths(self.pairing_dir, reqid)
        try:
            while True:
                found = await asyncio.to_thread(pq.outcome, self.pairing_dir, reqid)
                if found is not None and found[0] == "approved" and not await self._hold(reader):
                    return
                if found is None and not await asyncio.to_thread(qpath.exists):
                    if await asyncio.to_thread(pq.outcome, self.pairing_dir, reqid):
                        continue  # decided between the two looks (the decision is written
                        # before the request is deleted): delivered on the next pass
                    # decided and delivered on another connection of the same agent:
                    # an approval is kept, so this connection gets it too
                    kept = await asyncio.to_thread(self._kept_approval, record)
                    if kept is not None:
                        await self._resume_approved(reader, writer, kept, answered=True)
                    return
                if found is not None:
                    status, raw = found
                    sent = await self._send(writer, frame(raw.strip()))
                    await self._delete(*((apath, qpath) if status == "approved" else (dpath,)))
                    event("pair-deliver", logging.INFO if sent else logging.WARNING,
                          reqid=reqid, status=status, sent=int(sent))  # fmt: skip
                    return
                if eof.done() and (eof.exception() is not None or eof.result() == b""):
                    await self._withdraw(reqid, "disconnected")
                    return
                remaining = deadline - loop.time()
                if remaining <= 0 or stop.done():
                    reason = "approval timeout" if remaining <= 0 else "pairing mode stopped"
                    await self._delete(qpath)
                    event("pair-timeout" if remaining <= 0 else "pair-abandon",
                          logging.WARNING, reqid=reqid, reason=reason)  # fmt: skip
                    await self._send(writer, response_bytes(200, {"status": "denied",
                                                                  "reason": reason}))  # fmt: skip
                    return
                waiters: set[asyncio.Future[Any]] = {stop}
                if not eof.done():
                    waiters.add(eof)
                await asyncio.wait(
                    waiters, timeout=min(self.poll_interval, remaining),
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
        finally:
            for f in (eof, stop):
                if not f.done():
                    f.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(eof, stop, return_exceptions=True)
