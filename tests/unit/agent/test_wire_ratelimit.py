from __future__ import annotations

import asyncio

import pytest

from agent.common.ratelimit import RateLimiter, RateSpec
from agent.common.wire import (
    RequestError,
    parse_response,
    read_request,
    request_bytes,
    response_bytes,
)


def _read(data: bytes) -> object:
    async def go() -> object:
        r = asyncio.StreamReader()
        r.feed_data(data)
        r.feed_eof()
        return await read_request(r)

    return asyncio.run(go())


def test_response_framing_exact() -> None:
    assert response_bytes(404, {"error": "not found"}) == (
        b"HTTP/1.0 404 Not Found\r\nContent-Type: application/json\r\n"
        b'Content-Length: 21\r\n\r\n{"error":"not found"}'
    )


def test_read_request_ok_http11_with_lwp_headers() -> None:
    raw = (
        b"POST /ping HTTP/1.1\r\nTE: deflate,gzip;q=0.3\r\nConnection: TE, close\r\n"
        b"Host: vm:7450\r\nUser-Agent: libwww-perl/6.68\r\nContent-Length: 28\r\n"
        b'Content-Type: application/json\r\n\r\n{"reqid":"fb1c2a17d11ce0fc"}'
    )
    req = _read(raw)
    assert req.method == "POST" and req.path == "/ping"  # type: ignore[attr-defined]
    assert req.body == b'{"reqid":"fb1c2a17d11ce0fc"}'  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", 400),
        (b"\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\n" + b"X: y\r\n" * 33 + b"\r\n", 431),
        (b"POST /run HTTP/1.0\r\nContent-Length: 1048577\r\n\r\n", 413),
        (b"POST /run HTTP/1.0\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /run HTTP/1.0\r\nContent-Length: 10\r\n\r\nabc", 400),
    ],
)
def test_read_request_refusals(raw: bytes, code: int) -> None:
    with pytest.raises(RequestError) as exc:
        _read(raw)
    assert exc.value.code == code


def test_32_headers_is_fine() -> None:
    req = _read(b"GET /x HTTP/1.0\r\n" + b"X: y\r\n" * 32 + b"\r\n")
    assert req.path == "/x"  # type: ignore[attr-defined]


def test_client_roundtrip() -> None:
    data = request_bytes("POST", "/run", {"a": 1}, host="h")
    assert data.startswith(b"POST /run HTTP/1.1\r\nHost: h\r\n")
    assert b"Content-Length: 7\r\n" in data
    resp = parse_response(response_bytes(200, {"ok": 1}))
    assert resp.code == 200 and resp.json() == {"ok": 1}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_volume_limit_blocks_11th_and_expires() -> None:
    clock = Clock()
    events: list[tuple[str, str, str]] = []
    rl = RateLimiter(RateSpec(10, 60, 300), RateSpec(3, 600, 3600), clock=clock,
                     on_event=lambda *a: events.append(a))  # fmt: skip
    assert [rl.record_connection("1.2.3.4") for _ in range(10)] == [False] * 10
    assert rl.record_connection("1.2.3.4") is True
    assert rl.blocked("1.2.3.4") and not rl.blocked("5.6.7.8")
    assert events == [("rate-block", "1.2.3.4", "volume")]
    clock.t += 301
    assert not rl.blocked("1.2.3.4")
    assert rl.record_connection("1.2.3.4") is False


def test_probe_limit_and_disable() -> None:
    clock = Clock()
    rl = RateLimiter(RateSpec(10, 60, 300), RateSpec(3, 600, 3600), clock=clock)
    for _ in range(3):
        rl.record_failure("9.9.9.9")
    assert rl.blocked("9.9.9.9")
    off = RateLimiter(RateSpec(1, 60, 300), RateSpec(1, 600, 3600), disabled=True)
    for _ in range(5):
        assert not off.record_connection("1.1.1.1")
        off.record_failure("1.1.1.1")
    assert not off.blocked("1.1.1.1")


def test_eviction_at_capacity() -> None:
    events: list[tuple[str, str, str]] = []
    rl = RateLimiter(RateSpec(10, 60, 300), RateSpec(3, 600, 3600), max_ips=2,
                     on_event=lambda *a: events.append(a))  # fmt: skip
    for ip in ("a", "b", "c"):
        rl.record_connection(ip)
    assert ("rate-evict", "a", "capacity") in events


def test_json_depth_limit() -> None:
    import json as _json

    from agent.common.wire import MAX_JSON_DEPTH, json_too_deep

    n = MAX_JSON_DEPTH
    assert not json_too_deep(b"[" * n + b"]" * n)
    assert json_too_deep(b"[" * (n + 1) + b"]" * (n + 1))
    assert json_too_deep(b'{"a":' * (n + 1) + b"1" + b"}" * (n + 1))
    assert json_too_deep(b"[" * 100_000)  # unbalanced: still refused before parsing
    assert not json_too_deep(_json.dumps({"s": "[" * 1000, "t": '\\"[[[' * 100}).encode())
    assert not json_too_deep(b"[" + b"[1]," * 10_000 + b"1]")  # many brackets, shallow
