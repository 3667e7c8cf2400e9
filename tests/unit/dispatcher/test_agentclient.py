"""dispatcher.client.aio, .blocking and ``ced``'s fan-out against local asyncio servers.

The three clients run every framing, error-string and session test (the ``client``
fixture): they share dispatcher.client.wire and must give the same replies.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.common.tlsconf import client_context, server_context
from agent.common.wire import read_request, response_bytes
from dispatcher.client import aio as agentclient
from dispatcher.client import blocking as blockingclient
from dispatcher.client import fanout
from dispatcher.client.aio import NO_DATA, AgentRequest, SessionCache, call
from dispatcher.client.blocking import BLOCKING
from dispatcher.client.io import AgentIO, run_blocking
from dispatcher.reqid import new_reqid
from ops.lab.pki import Issued, TestCA

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Call = Callable[..., Awaitable[agentclient.AgentReply]]


@dataclass(frozen=True)
class T:
    name: str
    address: str
    port: int


async def _asyncio_call(*args: Any, **kw: Any) -> agentclient.AgentReply:
    """The asyncio client; the arguments are :class:`AgentRequest`'s."""
    return await call(AgentRequest(*args, **kw))


async def _blocking_call(*args: Any, **kw: Any) -> agentclient.AgentReply:
    """The blocking client on a worker thread, so the test's asyncio server keeps serving."""
    return await asyncio.to_thread(blockingclient.call, AgentRequest(*args, **kw))


async def _fanout_call(*args: Any, **kw: Any) -> agentclient.AgentReply:
    """The request as a job of ``ced``'s fan-out (its own loop, on a worker thread)."""
    req = AgentRequest(*args, **kw)

    def run() -> agentclient.AgentReply:
        out = blockingclient.on_a_loop([lambda: BLOCKING.call(req)], 1)[0]
        if isinstance(out, BaseException):
            raise out
        return out

    return await asyncio.to_thread(run)


_CLIENTS = {"asyncio": _asyncio_call, "blocking": _blocking_call, "fan-out": _fanout_call}


@pytest.fixture(params=list(_CLIENTS))
def client(request: pytest.FixtureRequest) -> Call:
    return _CLIENTS[request.param]


@pytest.fixture(scope="module")
def server_cert(pki: TestCA) -> Issued:
    return pki.issue("unit-agent", cn="agent.test")


@pytest.fixture(scope="module")
def cctx(pki: TestCA, dispatcher_cert: Issued) -> ssl.SSLContext:
    return client_context(str(pki.cert_path), str(dispatcher_cert.cert), str(dispatcher_cert.key))


def sctx(pki: TestCA, cert: Issued) -> ssl.SSLContext:
    return server_context(str(cert.cert), str(cert.key), str(pki.cert_path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(handler: Handler, tls: ssl.SSLContext | None) -> tuple[asyncio.Server, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    return srv, int(srv.sockets[0].getsockname()[1])


def answer(raw: bytes, seen: list[bytes] | None = None) -> Handler:
    """A handler that reads one request (kept in ``seen``) and writes ``raw``."""

    async def h(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        if seen is not None:
            seen.append(req.method.encode() + b" " + req.path.encode())
            seen.append(json.dumps(req.headers).encode())
            seen.append(req.body)
        writer.write(raw)
        await writer.drain()
        writer.close()

    return h


def one(
    client: Call,
    handler: Handler,
    tls: ssl.SSLContext | None,
    cctx: ssl.SSLContext,
    path: str = "/run",
    body: dict[str, Any] | None = None,
    timeout: float = 5,
    **kw: Any,
) -> agentclient.AgentReply:
    async def main() -> agentclient.AgentReply:
        srv, port = await serve(handler, tls)
        async with srv:
            return await client("127.0.0.1", port, "POST", path, body or {"reqid": "r"}, cctx,
                                timeout, "unit", **kw)  # fmt: skip

    return asyncio.run(main())


# ----- framing --------------------------------------------------------------------------


def test_request_framing_and_json_reply(client: Call, pki: TestCA, server_cert: Issued,
                                        cctx: ssl.SSLContext) -> None:  # fmt: skip
    seen: list[bytes] = []
    body = {"script": "s", "args": ["a b"], "reqid": "r1", "username": "", "token": ""}
    r = one(client, answer(response_bytes(200, {"exit": 0, "stdout": "x"}), seen), sctx(pki, server_cert),
            cctx, body=body)  # fmt: skip
    assert (r.code, r.body, r.error) == (200, {"exit": 0, "stdout": "x"}, "")
    assert seen[0] == b"POST /run"
    headers = json.loads(seen[1])
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(seen[2])
    assert re.fullmatch(r"127\.0\.0\.1:\d+", headers["host"])
    assert "transfer-encoding" not in headers and len(headers) <= 32
    assert json.loads(seen[2]) == body
    assert r.rtt == f"{r.rtt_ms}ms"


def test_request_line_is_http11(
    client: Call, pki: TestCA, server_cert: Issued, cctx: ssl.SSLContext
) -> None:
    lines: list[bytes] = []

    async def h(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(response_bytes(200, {}))
        writer.close()

    r = one(client, h, sctx(pki, server_cert), cctx, path="/ping")
    head = lines[0].decode().split("\r\n")
    assert head[0] == "POST /ping HTTP/1.1"
    assert head[1:4] == [f"Host: 127.0.0.1:{head[1].rsplit(':', 1)[1]}", "Connection: close",
                         "Content-Type: application/json"]  # fmt: skip
    assert head[4].startswith("Content-Length: ")
    assert r.code == 200


def test_eof_terminated_body_and_exact_content_length(
    client: Call, pki: TestCA, server_cert: Issued, cctx: ssl.SSLContext
) -> None:
    raw = b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"a":1}'
    assert one(client, answer(raw), sctx(pki, server_cert), cctx).body == {"a": 1}
    raw = b'HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\n{"a":2}GARBAGE'
    assert one(client, answer(raw), sctx(pki, server_cert), cctx).body == {"a": 2}


def test_large_body_is_read_whole(
    client: Call, pki: TestCA, server_cert: Issued, cctx: ssl.SSLContext
) -> None:
    out = "x" * 3_000_000
    r = one(client, answer(response_bytes(200, {"stdout": out})), sctx(pki, server_cert), cctx)
    assert r.body is not None and r.body["stdout"] == out


def test_invalid_json_body(
    client: Call, pki: TestCA, server_cert: Issued, cctx: ssl.SSLContext
) -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nnot"
    r = one(client, answer(raw), sctx(pki, server_cert), cctx)
    assert (r.code, r.body, r.error) == (200, None, "")


# ----- HTTP error codes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "body", "error"),
    [
        (403, {"error": "serial mismatch", "status": "forbidden"}, "forbidden: serial mismatch"),
        (403, {"status": "forbidden"}, "forbidden: 403 Forbidden"),
        (413, {"error": "request too large"}, "request too large"),
        (404, {"error": "not found"}, "404 Not Found"),
        (431, {"error": "too many headers"}, "431 Request Header Fields Too Large"),
        (409, {"status": "busy"}, "409 Conflict"),
        (202, {"status": "accepted"}, ""),
    ],
)
def test_http_codes(client: Call, pki: TestCA, server_cert: Issued, cctx: ssl.SSLContext, code: int,
                    body: dict[str, Any], error: str) -> None:  # fmt: skip
    r = one(client, answer(response_bytes(code, body)), sctx(pki, server_cert), cctx)
    assert (r.code, r.body, r.error) == (code, body, error)


# ----- transport errors -------------------------------------------------------------------------


def test_connection_refused(client: Call, cctx: ssl.SSLContext) -> None:
    port = free_port()
    r = asyncio.run(client("127.0.0.1", port, "POST", "/run", {}, cctx, 5, "x"))
    assert r.code is None
    assert r.error == (f"host '127.0.0.1' did not respond on port {port} - connection refused "
                       "(agent not running, or wrong port?)")  # fmt: skip


def test_does_not_resolve(client: Call, cctx: ssl.SSLContext) -> None:
    r = asyncio.run(client("no-such-host.invalid", 7443, "POST", "/ping", {}, cctx, 10, "x"))
    assert r.error == (
        "host 'no-such-host.invalid' did not resolve - check the name or use an IP address"
    )


@pytest.mark.parametrize("err", [errno.EHOSTUNREACH, errno.ENETUNREACH])
def test_unreachable(
    client: Call, cctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    async def fail(*a: Any, **kw: Any) -> Any:
        raise OSError(err, "unreachable")

    def fail_blocking(*a: Any, **kw: Any) -> Any:
        raise OSError(err, "unreachable")

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", fail)
    monkeypatch.setattr(blockingclient, "connect", fail_blocking)
    r = asyncio.run(client("192.0.2.1", 7443, "POST", "/ping", {}, cctx, 5, "x"))
    assert r.error == "host '192.0.2.1' is unreachable - no route to host or network down"


def test_blocking_connect_tries_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    closed = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))
    deadline = time.monotonic() + 5
    monkeypatch.setattr(blockingclient, "_addrinfo", lambda a, p: [closed, closed])
    with pytest.raises(ConnectionRefusedError):  # the same error twice: that error
        blockingclient.connect("x", port, deadline)
    srv = socket.create_server(("127.0.0.1", 0))
    with srv:
        good = (*closed[:4], srv.getsockname())
        monkeypatch.setattr(blockingclient, "_addrinfo", lambda a, p: [closed, good])
        with blockingclient.connect("x", port, deadline) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    other = (*closed[:4], ("127.0.0.1", free_port()))
    monkeypatch.setattr(blockingclient, "_addrinfo", lambda a, p: [closed, other])
    monkeypatch.setattr(blockingclient.socket.socket, "connect", _refuse_with_address)
    with pytest.raises(OSError, match=r"^Multiple exceptions: ") as info:
        blockingclient.connect("x", port, deadline)
    assert not isinstance(info.value, ConnectionRefusedError)


def _refuse_with_address(sock: socket.socket, addr: Any) -> None:
    raise ConnectionRefusedError(errno.ECONNREFUSED, f"Connect call failed {addr}")


def test_blocking_addrinfo_answers_ip_literals() -> None:
    assert blockingclient._addrinfo("127.0.0.1", 1)[0][4] == ("127.0.0.1", 1)
    assert blockingclient._addrinfo("::1", 1)[0][4] == ("::1", 1, 0, 0)
    assert blockingclient._addrinfo("localhost", 1)  # through getaddrinfo


def test_silent_listener_times_out_in_handshake(client: Call, cctx: ssl.SSLContext) -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    t0 = time.monotonic()
    r = one(client, never, None, cctx, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert r.error == "host '127.0.0.1' did not respond - connection timed out"
    assert 0.45 <= elapsed < 2
    assert 450 <= r.rtt_ms < 2000


@pytest.mark.parametrize(("path", "error"), [
    ("/run", "read timeout after 0.5s"),
    ("/ping", "host '127.0.0.1' did not respond - connection timed out"),
])  # fmt: skip
def test_no_answer_after_request(client: Call, pki: TestCA, server_cert: Issued, cctx: ssl.SSLContext,
                                 path: str, error: str) -> None:  # fmt: skip
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    r = one(client, slow, sctx(pki, server_cert), cctx, path=path, timeout=0.5)
    assert r.error == error


def test_read_timeout_formats_whole_seconds(pki: TestCA, server_cert: Issued,
                                            cctx: ssl.SSLContext) -> None:  # fmt: skip
    assert agentclient.fmt_seconds(60.0) == "60"
    assert agentclient.fmt_seconds(2.5) == "2.5"


def test_untrusted_agent_certificate(client: Call, tmp_path: Path, cctx: ssl.SSLContext) -> None:
    other = TestCA(tmp_path / "other")
    r = one(client, answer(response_bytes(200, {})), sctx(other, other.issue("a")), cctx)
    assert r.error == "TLS handshake with '127.0.0.1' failed - certificate or trust mismatch"


def test_client_cert_rejected_by_agent(
    client: Call, pki: TestCA, server_cert: Issued, tmp_path: Path
) -> None:
    other = TestCA(tmp_path / "other")
    bad = other.issue("disp")
    ctx = client_context(str(pki.cert_path), str(bad.cert), str(bad.key))
    r = one(client, answer(response_bytes(200, {})), sctx(pki, server_cert), ctx)
    assert r.error == "TLS handshake with '127.0.0.1' failed - certificate or trust mismatch"


def test_plain_http_server_is_a_tls_failure(client: Call, cctx: ssl.SSLContext) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        writer.close()

    r = one(client, plain, None, cctx)
    assert r.error == "TLS handshake with '127.0.0.1' failed - certificate or trust mismatch"


def test_close_without_response(
    client: Call, pki: TestCA, server_cert: Issued, cctx: ssl.SSLContext
) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    r = one(client, mute, sctx(pki, server_cert), cctx)
    assert (r.code, r.error) == (None, NO_DATA)


# ----- TLS session reuse -------------------------------------------------------------------------


def test_sessions_are_resumed_per_address(client: Call, pki: TestCA, server_cert: Issued,
                                          cctx: ssl.SSLContext) -> None:  # fmt: skip
    async def main() -> list[bool]:
        srv, port = await serve(answer(response_bytes(200, {"ok": 1})), sctx(pki, server_cert))
        cache = SessionCache()
        out = []
        async with srv:
            for _ in range(3):
                r = await client("127.0.0.1", port, "POST", "/ping", {}, cctx, 5, "x",
                               sessions=cache)  # fmt: skip
                assert r.body == {"ok": 1}
                out.append(r.resumed)
            assert len(cache) == 1 and cache.resumed == 2
            r = await client("127.0.0.1", port, "POST", "/ping", {}, cctx, 5, "x",
                           use_sessions=False)  # fmt: skip
            out.append(r.resumed)
        return out

    assert asyncio.run(main()) == [False, True, True, False]


def test_default_cache_belongs_to_the_context(client: Call, pki: TestCA, server_cert: Issued,
                                              dispatcher_cert: Issued) -> None:  # fmt: skip
    ctx = client_context(str(pki.cert_path), str(dispatcher_cert.cert), str(dispatcher_cert.key))

    async def main() -> list[bool]:
        srv, port = await serve(answer(response_bytes(200, {})), sctx(pki, server_cert))
        async with srv:
            a = await client("127.0.0.1", port, "POST", "/ping", {}, ctx, 5, "x")
            b = await client("127.0.0.1", port, "POST", "/ping", {}, ctx, 5, "x")
        return [a.resumed, b.resumed]

    assert asyncio.run(main()) == [False, True]
    assert len(agentclient.sessions_for(ctx)) == 1


def test_session_cache_is_bounded() -> None:
    cache = SessionCache(max_entries=2)
    fake: Any = object()
    for i in range(3):
        cache.put(f"10.0.0.{i}", 1, fake)
    assert len(cache) == 2 and cache.get("10.0.0.0", 1) is None
    assert cache.get("10.0.0.2", 1) is fake


# ----- fan_out and helpers ---------------------------------------------------------------------


@pytest.mark.parametrize("io", [None, BLOCKING], ids=["asyncio", "blocking"])
def test_fan_out_order_and_parallel_limit(io: AgentIO | None) -> None:
    live = peak = 0
    lock = threading.Lock()

    async def fn(t: fanout.TargetLike) -> str:
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        await (io or agentclient.ASYNCIO).sleep(0.05 if t.port % 2 else 0.01)
        with lock:
            live -= 1
        return t.name

    targets = [T(f"h{i}", "127.0.0.1", i) for i in range(10)]
    drive = run_blocking if io is not None else asyncio.run
    out = drive(fanout.fan_out(targets, fn, 3, io=io))
    assert out == [f"h{i}" for i in range(10)]
    assert peak == 3


@pytest.mark.parametrize("io", [None, BLOCKING], ids=["asyncio", "blocking"])
def test_fan_out_errors(io: AgentIO | None) -> None:
    async def fn(t: fanout.TargetLike) -> str:
        if t.name == "bad":
            raise RuntimeError("boom")
        return t.name

    drive = run_blocking if io is not None else asyncio.run
    targets = [T("a", "x", 1), T("bad", "x", 1), T("c", "x", 1)]
    out = drive(fanout.fan_out(targets, fn, 2, lambda t, e: f"{t.name}:{e}", io=io))
    assert out == ["a", "bad:boom", "c"]
    with pytest.raises(RuntimeError):
        drive(fanout.fan_out(targets, fn, 2, io=io))
    one_target = drive(fanout.fan_out(targets[1:2], fn, 2, lambda t, e: f"{t.name}:{e}", io=io))
    assert one_target == ["bad:boom"]  # a single job runs on the calling thread


def test_blocking_fan_out_copies_the_log_context() -> None:
    async def fn(t: fanout.TargetLike) -> str:
        return str(_CTX.get())

    token = _CTX.set("outer")
    try:
        out = run_blocking(fanout.fan_out([T("a", "x", 1), T("b", "x", 1)], fn, 2, io=BLOCKING))
    finally:
        _CTX.reset(token)
    assert out == ["outer", "outer"]


_CTX: contextvars.ContextVar[str] = contextvars.ContextVar("test_ctx", default="unset")


def test_run_blocking_refuses_a_suspending_coroutine() -> None:
    async def suspends() -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="suspended"):
        run_blocking(suspends())
    with pytest.raises(KeyError):
        run_blocking(_raises())


async def _raises() -> None:
    raise KeyError("x")


def test_too_many_hosts(cctx: ssl.SSLContext) -> None:
    targets = [T(f"h{i}", "127.0.0.1", 1) for i in range(3)]
    with pytest.raises(ValueError, match=r"too many hosts \(max 2\)"):
        asyncio.run(fanout.ping_all(targets, "r", fanout.Reach(cctx, 1, 4, max_hosts=2)))


def test_canonicalise() -> None:
    assert fanout.canonicalise({"reported_hostname": "a"}, "a") == {"host": "a"}
    assert fanout.canonicalise({"reported_hostname": ""}, "a") == {"host": "a"}
    assert fanout.canonicalise({"reported_hostname": "b"}, "a") == {
        "reported_hostname": "b", "host": "a"}  # fmt: skip


def test_new_reqid() -> None:
    ids = {new_reqid() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
