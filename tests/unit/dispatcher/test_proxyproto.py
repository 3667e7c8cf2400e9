"""PROXY protocol v2 parsing and the pre-TLS header read (dispatcher.api.proxyproto)."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from agent.common.errors import ConfigError
from dispatcher import config as dconfig
from dispatcher.api import proxyproto as pp

# A header as HAProxy 2.6 sends it for 127.0.0.5:40000 -> 127.0.0.1:7545 (send-proxy-v2).
HAPROXY_V4 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a"  # signature
    "21"  # version 2, PROXY
    "11"  # AF_INET, STREAM
    "000c"  # 12 bytes follow
    "7f000005"  # 127.0.0.5
    "7f000001"  # 127.0.0.1
    "9c40"  # 40000
    "1d79"  # 7545
)


def test_parse_haproxy_tcp4() -> None:
    h = pp.parse(HAPROXY_V4)
    assert (h.command, h.family) == ("PROXY", "TCP4")
    assert h.source == ("127.0.0.5", 40000) and h.destination == ("127.0.0.1", 7545)
    assert h.client == ("127.0.0.5", 40000) and h.length == 28 and h.tlvs == []
    assert pp.build(("127.0.0.5", 40000), ("127.0.0.1", 7545)) == HAPROXY_V4


def test_parse_tcp6_with_tlvs() -> None:
    data = pp.build(("2001:db8::7", 51000), ("::1", 7545), tlvs=[(0x04, b"x" * 5), (0xE0, b"")])
    h = pp.parse(data)
    assert (h.command, h.family) == ("PROXY", "TCP6")
    assert h.source == ("2001:db8::7", 51000) and h.destination == ("::1", 7545)
    assert h.tlvs == [(0x04, b"xxxxx"), (0xE0, b"")]
    assert h.length == 16 + 36 + 8 + 3


def test_local_keeps_the_tcp_peer() -> None:
    h = pp.parse(pp.build(None, local=True))
    assert (h.command, h.family, h.source, h.client) == ("LOCAL", "UNSPEC", None, None)
    # LOCAL with an address block (allowed by the spec): the addresses are ignored
    v4 = bytearray(HAPROXY_V4)
    v4[12] = 0x20
    h = pp.parse(bytes(v4))
    assert (h.command, h.family, h.client) == ("LOCAL", "TCP4", None)


def test_proxy_unspec_and_unix_keep_the_tcp_peer() -> None:
    assert pp.parse(pp.build(None)).client is None
    unix = pp.SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + b"\0" * 216
    h = pp.parse(unix)
    assert (h.family, h.client) == ("UNIX", None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad signature"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40, "bad signature"),
        (b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 7545\r\n", "v1"),
        (HAPROXY_V4[:12] + b"\x11" + HAPROXY_V4[13:], "version 1"),
        (HAPROXY_V4[:12] + b"\x22" + HAPROXY_V4[13:], "unknown command"),
        (HAPROXY_V4[:13] + b"\x41" + HAPROXY_V4[14:], "unknown address family"),
        (HAPROXY_V4[:13] + b"\x13" + HAPROXY_V4[14:], "unknown transport"),
        (HAPROXY_V4[:13] + b"\x12" + HAPROXY_V4[14:], "not a stream"),
        (HAPROXY_V4[:14] + b"\x00\x08" + HAPROXY_V4[16:24], "too short"),
        (HAPROXY_V4[:-1], "truncated"),
        (HAPROXY_V4[:10], "prefix must be 16 bytes"),
        (HAPROXY_V4 + b"\x16", "header is 28 bytes, got 29"),
        (pp.SIGNATURE + b"\x21\x11\xff\xff" + b"\0" * 12, "too large"),
        (pp.SIGNATURE + b"\x21\x11\x00\x0e" + HAPROXY_V4[16:] + b"\x04\x00", "truncated TLV"),
        (pp.SIGNATURE + b"\x21\x11\x00\x10" + HAPROXY_V4[16:] + b"\x04\x00\x05\x00",
         "truncated TLV"),
    ],
)  # fmt: skip
def test_malformed_headers_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(pp.ProxyProtocolError, match=message):
        pp.parse(data)


def test_oversized_limit_is_configurable() -> None:
    data = pp.build(("127.0.0.5", 1), ("127.0.0.1", 2), tlvs=[(0xE1, b"y" * 2000)])
    with pytest.raises(pp.ProxyProtocolError, match="too large"):
        pp.parse(data)
    assert pp.parse(data, max_payload=4096).tlvs[0][1] == b"y" * 2000


async def _read_from(chunks: list[bytes], close: bool) -> tuple[pp.ProxyHeader, bytes]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:

        async def feed() -> None:
            for c in chunks:
                b.sendall(c)
                await asyncio.sleep(0.01)
            if close:
                b.shutdown(socket.SHUT_WR)

        feeder = asyncio.create_task(feed())
        header = await asyncio.wait_for(pp.read_header(a), 2)
        await feeder
        a.setblocking(True)
        a.settimeout(1)
        rest = a.recv(100)
        return header, rest
    finally:
        a.close()
        b.close()


def test_read_header_consumes_exactly_the_header() -> None:
    # the header arrives in pieces and the TLS ClientHello right behind it
    hello = b"\x16\x03\x01\x00\x05hello"
    data = HAPROXY_V4 + hello
    header, rest = asyncio.run(_read_from([data[:5], data[5:20], data[20:]], close=False))
    assert header.source == ("127.0.0.5", 40000)
    assert rest == hello


def test_read_header_truncated_connection() -> None:
    with pytest.raises(pp.ProxyProtocolError, match="truncated header"):
        asyncio.run(_read_from([HAPROXY_V4[:20]], close=True))
    with pytest.raises(pp.ProxyProtocolError, match="after 0 bytes"):
        asyncio.run(_read_from([], close=True))


def test_read_header_refuses_oversized_before_reading_it() -> None:
    big = pp.SIGNATURE + b"\x21\x11\xff\xff"
    with pytest.raises(pp.ProxyProtocolError, match="too large"):
        asyncio.run(_read_from([big], close=False))  # nothing more is awaited


def test_trusted_sources() -> None:
    nets = pp.parse_sources(["127.0.0.1", "10.1.0.0/16", "fd00::/8"])
    assert pp.trusted("127.0.0.1", nets) and pp.trusted("10.1.200.3", nets)
    assert pp.trusted("::ffff:127.0.0.1", nets) and pp.trusted("fd12::1", nets)
    assert not pp.trusted("127.0.0.5", nets) and not pp.trusted("10.2.0.1", nets)
    assert not pp.trusted("garbage", nets)
    with pytest.raises(ValueError, match="not an address"):
        pp.parse_sources(["127.0.0.1", "haproxy.example"])


def test_config_keys(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text("api_proxy_port = 7447\napi_proxy_sources = 127.0.0.1, 10.0.0.0/8\n")
    cfg = dconfig.load(str(conf))
    assert cfg.api_proxy_port == 7447 and cfg.api_proxy_sources == ["127.0.0.1", "10.0.0.0/8"]
    assert not cfg.warnings
    pp.check_config(cfg)
    default = dconfig.load(str(tmp_path / "missing.conf"), required=False)
    assert default.api_proxy_port == 0 and default.api_proxy_sources == ["127.0.0.1"]
    cfg.api_proxy_sources = ["nope"]
    with pytest.raises(ConfigError, match="nope"):
        pp.check_config(cfg)
    cfg.api_proxy_sources = []
    with pytest.raises(ConfigError, match="empty"):
        pp.check_config(cfg)


def test_proxied_protocol_class_overrides_client() -> None:
    class Base:
        def __init__(self) -> None:
            self.client: tuple[str, int] | None = None
            self.app_state: dict[str, object] = {"shared": 1}

        def connection_made(self, transport: object) -> None:
            self.client = ("127.0.0.1", 5555)

    cls = pp.proxied_protocol_class(Base)
    assert pp.proxied_protocol_class(Base) is cls and issubclass(cls, Base)
    shared: dict[str, object] = {"shared": 1}
    p: Any = cls()
    p.app_state = shared
    p.proxy_client, p.proxy_peer = ("127.0.0.5", 40000), "127.0.0.1"
    p.connection_made(None)
    assert p.client == ("127.0.0.5", 40000)
    assert p.app_state == {"shared": 1, "proxy_peer": "127.0.0.1"} and shared == {"shared": 1}
    q: Any = cls()
    q.proxy_peer = "127.0.0.1"
    q.connection_made(None)  # LOCAL: the TCP peer stays
    assert q.client == ("127.0.0.1", 5555)


def test_pairing_proxy_port_config(tmp_path: Path) -> None:
    from dispatcher.proxyv2 import check_pairing_config

    conf = tmp_path / "c.conf"
    conf.write_text("pairing_proxy_port = 7448\n")
    cfg = dconfig.load(str(conf))
    assert cfg.pairing_proxy_port == 7448 and not cfg.warnings
    check_pairing_config(cfg)  # the default api_proxy_sources: 127.0.0.1
    cfg.api_proxy_sources = []
    with pytest.raises(ConfigError, match="pairing_proxy_port is set but api_proxy_sources"):
        check_pairing_config(cfg)
    conf.write_text("pairing_proxy_port = 7444\n")  # the pairing port itself
    problems = dconfig.instance_problems(dconfig.load(str(conf)))
    assert any("pairing_proxy_port 7444 is also pairing_port" in str(p) for p in problems)
