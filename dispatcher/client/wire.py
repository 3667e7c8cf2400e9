"""One mTLS request to one agent (spec 3.4), without the I/O: shared by both clients.

:mod:`dispatcher.client.aio` (asyncio, for the API daemon and large fan-outs) and
:mod:`dispatcher.client.blocking` (plain sockets, for the one-shot ``ced``) only connect
and move bytes; everything else is here and imports neither asyncio nor threads:

* the request: an HTTP/1.1 line with ``Host``, ``Connection: close`` and, with a body,
  ``Content-Type: application/json`` plus ``Content-Length`` (never chunked);
* the TLS client over memory BIOs (:meth:`Attempt.exchange`, a generator the driver
  feeds), so a cached ``ssl.SSLSession`` per agent address can be offered (TLS 1.3
  ticket resumption): the agent then skips its certificate signature and both sides
  skip chain verification. Sessions belong to the ``SSLContext`` that made them;
  :func:`sessions_for` keeps one cache per context;
* the reply: a head plus exactly ``Content-Length`` bytes (a body that ends at EOF is
  accepted), parsed into an :class:`AgentReply`;
* the agent's certificate checked against the registry's pins right after the handshake,
  before a byte of the request is written (:mod:`dispatcher.client.pins`);
* transport failures rewritten to upstream's strings (:meth:`Attempt.transport_error`,
  ``_transport_error`` in upstream's engine): the ``<h>`` in them is the connect address,
  as upstream's is.

What to send where is one :class:`AgentRequest` (address, port, method, path, body,
client context, timeout, registry name, session cache); every client takes it whole.
A driver makes an :class:`Attempt` of it, connects (phase ``connect``), then runs
:meth:`Attempt.exchange`: it yields ``bytes`` to send (send back ``b""``) or ``None`` to
ask for input (send back what was read, ``b""`` at EOF), and returns the raw response.
One deadline (``timeout``) covers connect, handshake, request and response; its expiry
is a ``TimeoutError``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import ssl
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Generator
from typing import Any, Protocol

from agent.common.errors import ProtocolError
from agent.common.records import record
from agent.common.wire import parse_head, request_bytes
from dispatcher.client.pins import COUNTERS, PinMismatch, Pins, peer_identity

MAX_RESPONSE = 128 * 1024 * 1024
READ_CHUNK = 256 * 1024
NO_DATA = "500 Server closed connection without sending any data back"


#: What :meth:`Attempt.exchange` yields: bytes to send, or None to ask for input.
Exchange = Generator[bytes | None, bytes | memoryview, bytes]


class TargetLike(Protocol):
    """An agent to reach: ``dispatcher.registry.Target`` fits."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...


@record(frozen=True)
class AgentRequest:
    """One request to one agent: what every client (and :class:`Attempt`) takes.

    ``name`` (the registry name) only labels debug logs. ``sessions`` defaults to the
    cache of ``ctx`` (:func:`sessions_for`); ``use_sessions=False`` forces a full
    handshake and stores nothing. ``timeout`` covers connect, handshake, request and
    response.
    """

    address: str
    port: int
    method: str
    path: str
    body: dict[str, Any] | None
    ctx: ssl.SSLContext
    timeout: float
    name: str
    sessions: SessionCache | None = None
    use_sessions: bool = True
    pins: Pins | None = None

    @classmethod
    def to(
        cls,
        t: TargetLike,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        ctx: ssl.SSLContext,
        timeout: float,
        sessions: SessionCache | None = None,
    ) -> AgentRequest:
        """The request to target ``t`` (its address, port, registry name and pins)."""
        return cls(t.address, t.port, method, path, body, ctx, timeout, t.name, sessions,
                   pins=getattr(t, "pins", None))  # fmt: skip


@record
class AgentReply:
    """``code`` is None when no HTTP response arrived; ``error`` is "" on 2xx."""

    code: int | None
    body: dict[str, Any] | None
    rtt_ms: int
    error: str = ""
    status_line: str = ""
    resumed: bool = False
    peer: tuple[str, str] | None = None  # (serial, pubkey_sha256) the agent presented

    @property
    def rtt(self) -> str:
        return f"{self.rtt_ms}ms"


class SessionCache:
    """TLS sessions by ``(address, port)``, least recently used dropped first, each with the
    serial of the certificate its full handshake showed: a resumed session shows that
    certificate again, so it is offered only while the registry pins that serial alone (a
    pending renewal, or a promoted one, makes the next handshake a full one and the new
    certificate seen).

    A connection's session is kept as the finished ``SSLObject`` and copied out
    (``SSLObject.session``: about 0.2 ms, 10 % of a fresh request's CPU) only when it is
    first offered again: the one-shot ``ced`` that never contacts an agent twice pays
    nothing for it.

    Safe to share between the blocking client's threads (each step is one dict call).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[
            tuple[str, int], tuple[ssl.SSLSession | ssl.SSLObject, str | None]
        ] = OrderedDict()
        self.offered = 0
        self.resumed = 0

    def get(
        self, address: str, port: int, pinned: tuple[str, ...] | None = None
    ) -> ssl.SSLSession | None:
        """The session for ``address:port``; with ``pinned`` (the registry's serials), only
        one made with the single pinned serial."""
        key = (address, port)
        item = self._items.get(key)
        if item is None:
            return None
        if pinned is not None and (len(pinned) != 1 or item[1] != pinned[0]):
            return None
        kept = item[0]
        if isinstance(kept, ssl.SSLObject):
            session = _session_of(kept)
            if session is None:
                self._items.pop(key, None)
                return None
            self._items[key] = (session, item[1])
        else:
            session = kept
        with contextlib.suppress(KeyError):  # dropped meanwhile by another thread
            self._items.move_to_end(key)
        return session

    def put(
        self,
        address: str,
        port: int,
        session: ssl.SSLSession | ssl.SSLObject,
        serial: str | None = None,
    ) -> None:
        """Keep ``session`` for ``address:port``; given the finished connection instead
        (an ``SSLObject``), its session is copied out only when first offered."""
        key = (address, port)
        self._items[key] = (session, serial)
        with contextlib.suppress(KeyError):
            self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            with contextlib.suppress(KeyError):
                self._items.popitem(last=False)

    def drop(self, address: str, port: int) -> None:
        self._items.pop((address, port), None)

    def __len__(self) -> int:
        return len(self._items)


def _session_of(conn: ssl.SSLObject) -> ssl.SSLSession | None:
    """The resumable session of a finished connection (a TLS 1.3 one needs a ticket)."""
    s = conn.session
    if s is None or not (s.has_ticket or conn.version() == "TLSv1.2"):
        return None
    return s


_caches: weakref.WeakKeyDictionary[ssl.SSLContext, SessionCache] = weakref.WeakKeyDictionary()


def sessions_for(ctx: ssl.SSLContext) -> SessionCache:
    """The session cache that belongs to ``ctx`` (created on first use)."""
    cache = _caches.get(ctx)
    if cache is None:
        cache = _caches[ctx] = SessionCache()
    return cache


def fmt_seconds(t: float) -> str:
    """``60`` for 60.0, ``2.5`` for 2.5: how upstream interpolates its config value."""
    return f"{t:g}"


class ResponseTooLarge(ProtocolError):
    pass


class HandshakeRefused(ProtocolError):
    pass


#: Everything a request may raise that :meth:`Attempt.failed` turns into an error string.
TRANSPORT_ERRORS = (OSError, ssl.SSLError, TimeoutError, ValueError, ResponseTooLarge,
                    HandshakeRefused, PinMismatch)  # fmt: skip


def host_header(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class Attempt:
    """One request (an :class:`AgentRequest`): how far it got, and the reply.

    A driver connects to ``req.address``/``req.port``, runs :meth:`exchange`, and ends
    with :meth:`done` or, on one of :data:`TRANSPORT_ERRORS`, :meth:`failed`.
    """

    def __init__(self, req: AgentRequest) -> None:
        self.req = req
        sessions = req.sessions
        if sessions is None and req.use_sessions:
            sessions = sessions_for(req.ctx)
        self.sessions = sessions if req.use_sessions else None
        host = host_header(req.address, req.port)
        self.payload = request_bytes(req.method, req.path, req.body, host=host)
        self.phase = "connect"  # connect -> tls -> request -> response
        self.resumed = False
        self.got_data = False
        self.peer: tuple[str, str] | None = None
        self.t0 = time.monotonic()

    def exchange(self) -> Exchange:
        """Handshake, send the request, return the raw response bytes (see the module doc)."""
        req, sessions = self.req, self.sessions
        address, port, ctx = req.address, req.port, req.ctx
        self.phase = "tls"
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        pinned = req.pins.serials if req.pins is not None else None
        session = sessions.get(address, port, pinned) if sessions is not None else None
        try:
            sslobj = ctx.wrap_bio(incoming, outgoing, server_side=False, session=session)
        except ValueError:  # a session from another context
            if sessions is not None:
                sessions.drop(address, port)
            session = None
            sslobj = ctx.wrap_bio(incoming, outgoing, server_side=False)
        if session is not None and sessions is not None:
            sessions.offered += 1

        while True:
            try:
                sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if data := outgoing.read():
                    yield data
                _feed(incoming, (yield None))
        self.resumed = resumed = sslobj.session_reused
        version = sslobj.version()
        if resumed and sessions is not None:
            sessions.resumed += 1
        self._check_peer(sslobj.getpeercert(binary_form=True))

        self.phase = "request"
        sslobj.write(self.payload)
        if data := outgoing.read():
            yield data

        self.phase = "response"
        buf = bytearray()
        head_end = -1
        length: int | None = None
        while True:
            try:
                chunk = sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                if data := outgoing.read():  # post-handshake messages may want an answer
                    yield data
                _feed(incoming, (yield None))
                continue
            except ssl.SSLEOFError:  # TCP EOF without close_notify: the body ends here
                break
            if not chunk:  # close_notify
                break
            buf += chunk
            self.got_data = True
            if len(buf) > MAX_RESPONSE:
                raise ResponseTooLarge
            if head_end < 0:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    _, headers = parse_head(bytes(buf[:head_end]))
                    if "content-length" in headers:
                        length = int(headers["content-length"])
            if length is not None and len(buf) - head_end - 4 >= length:
                break
        if not buf and version == "TLSv1.3" and not resumed:
            s = sslobj.session
            if s is None or not s.has_ticket:
                # A TLS 1.3 client finishes its handshake before the server has checked
                # the client certificate; a server that then hangs up without a session
                # ticket has refused the handshake (usually our certificate).
                raise HandshakeRefused
        if sessions is not None and not resumed and version in ("TLSv1.2", "TLSv1.3"):
            # A resumed session stays cached, and a new one is copied out of this
            # connection only if it is offered again (SessionCache.get); the agent issues a
            # fresh ticket whenever it refuses the old one.
            sessions.put(address, port, sslobj, self.peer[0] if self.peer else None)
        return bytes(buf)

    def _check_peer(self, der: bytes | None) -> None:
        """Record who answered; :class:`PinMismatch` (before any request byte is written)
        unless the certificate is one the registry pinned for this agent."""
        pins = self.req.pins
        if pins is not None:
            self.peer = pins.check(der)
            return
        try:
            self.peer = peer_identity(der)
        except PinMismatch:
            self.peer = None

    def _rtt(self) -> int:
        return round((time.monotonic() - self.t0) * 1000)

    def failed(self, exc: BaseException) -> AgentReply:
        """The reply for a transport failure (one of :data:`TRANSPORT_ERRORS`)."""
        rtt = self._rtt()
        req = self.req
        refused = isinstance(exc, ssl.SSLError | HandshakeRefused | PinMismatch)
        if refused and self.sessions is not None:
            self.sessions.drop(req.address, req.port)
        if isinstance(exc, PinMismatch):
            COUNTERS.mismatch(req.name, f"{req.address}:{req.port}", str(exc))
        err = self.transport_error(exc)
        logging = sys.modules.get("logging")  # not imported: nothing can show a debug line
        if logging is not None:
            logging.getLogger("ctrl-exec.agentclient").debug(
                "%s %s to %s (%s:%s) failed in %s: %r", req.method, req.path, req.name,
                req.address, req.port, self.phase, exc)  # fmt: skip
        return AgentReply(None, None, rtt, err, resumed=self.resumed, peer=self.peer)

    def transport_error(self, exc: BaseException) -> str:
        """Upstream's string for ``exc``; ``<h>`` in it is the connect address."""
        req = self.req
        h = req.address
        timed_out = f"host '{h}' did not respond - connection timed out"
        tls = f"TLS handshake with '{h}' failed - certificate or trust mismatch"
        if isinstance(exc, TimeoutError):
            # LWP reports a read timeout once connected; only the run path names it so.
            if self.phase in ("request", "response") and req.path == "/run":
                return f"read timeout after {fmt_seconds(req.timeout)}s"
            return timed_out
        if isinstance(exc, socket.gaierror):
            return f"host '{h}' did not resolve - check the name or use an IP address"
        if isinstance(exc, ConnectionRefusedError):
            return (
                f"host '{h}' did not respond on port {req.port} - connection refused "
                "(agent not running, or wrong port?)"
            )
        if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"host '{h}' is unreachable - no route to host or network down"
        if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
            return timed_out
        if isinstance(exc, ssl.SSLError):
            if isinstance(exc, ssl.SSLEOFError) and self.phase == "response":
                return NO_DATA
            return tls
        if isinstance(exc, HandshakeRefused):
            return tls
        if isinstance(exc, PinMismatch):
            return str(exc)
        if isinstance(exc, ResponseTooLarge):
            return "500 response too large"
        if isinstance(exc, OSError):
            if self.phase == "tls":
                return tls  # LWP: "SSL connect attempt failed"
            if not self.got_data:
                return NO_DATA
            return f"500 {exc.strerror or exc}"
        if isinstance(exc, ValueError):
            return f"500 bad response from agent: {exc}"
        return f"500 {exc.__class__.__name__}: {exc}"

    def done(self, raw: bytes) -> AgentReply:
        """The reply parsed from the raw response bytes."""
        reply = parse_reply(raw, self._rtt(), self.resumed)
        reply.peer = self.peer
        return reply


def _feed(incoming: ssl.MemoryBIO, data: bytes | memoryview) -> None:
    if data:
        incoming.write(data)
    else:
        incoming.write_eof()


def parse_reply(raw: bytes, rtt: int, resumed: bool) -> AgentReply:
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        return AgentReply(None, None, rtt, NO_DATA if not raw else "500 truncated response head",
                          resumed=resumed)  # fmt: skip
    try:
        code, headers = parse_head(raw[:head_end])
    except ValueError as exc:
        return AgentReply(None, None, rtt, f"500 bad response from agent: {exc}", resumed=resumed)
    first = raw[:head_end].split(b"\r\n", 1)[0].decode("latin-1").split(None, 2)
    status_line = f"{code} {first[2] if len(first) > 2 else ''}".rstrip()
    data = raw[head_end + 4 :]
    if "content-length" in headers:
        data = data[: int(headers["content-length"])]
    parsed: dict[str, Any] | None = None
    try:
        obj = json.loads(data)
        if isinstance(obj, dict):
            parsed = obj
    except (ValueError, UnicodeDecodeError):
        parsed = None
    error = ""
    if code == 403:
        agent_err = parsed.get("error") if parsed is not None else None
        error = f"forbidden: {agent_err if agent_err is not None else status_line}"
    elif code == 413:
        error = "request too large"
    elif not 200 <= code < 300:
        error = status_line
    return AgentReply(code, parsed, rtt, error, status_line, resumed)
