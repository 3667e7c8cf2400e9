"""PROXY protocol v2 (haproxy ``doc/proxy-protocol.txt``): the header parser and the
trusted-sources rule, shared by the API's PROXY listener (:mod:`dispatcher.api.proxyproto`)
and the pairing listener's (:mod:`dispatcher.pairing.server`).

A header is read **before TLS**, from the raw socket, and exactly (:func:`read_header`):
the 16-byte prefix, then the announced length (at most :data:`MAX_PAYLOAD`), never a byte
more, so the TLS ClientHello stays in the kernel for the TLS layer. Only peers in the
configured sources (``api_proxy_sources``: the load balancers) may send one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.common.errors import ProtocolError
from dispatcher.config import DispatcherConfig
from dispatcher.netaddr import plain_ip

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PREFIX_LEN = 16
MAX_PAYLOAD = 1024  # addresses (at most 216 bytes, AF_UNIX) plus TLVs
VERSION = 2
CMD_LOCAL, CMD_PROXY = 0, 1
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0, 1, 2, 3
PROTO_UNSPEC, PROTO_STREAM, PROTO_DGRAM = 0, 1, 2
_ADDR_LEN = {AF_UNSPEC: 0, AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}

Address = tuple[str, int]


class ProxyProtocolError(ProtocolError, ValueError):
    """The bytes are not an acceptable PROXY v2 header."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY v2 header."""

    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4", "TCP6", "UNSPEC" or "UNIX"
    source: Address | None  # the client as the proxy saw it (TCP4/TCP6 PROXY only)
    destination: Address | None  # the address the client connected to
    tlvs: list[tuple[int, bytes]] = field(default_factory=list)
    length: int = PREFIX_LEN  # bytes the header occupied on the wire

    @property
    def client(self) -> Address | None:
        """The address to use for the client, or None to keep the TCP peer."""
        return self.source if self.command == "PROXY" else None


def payload_length(prefix: bytes, max_payload: int = MAX_PAYLOAD) -> int:
    """Check the 16-byte prefix; return how many header bytes follow it."""
    if len(prefix) != PREFIX_LEN:
        raise ProxyProtocolError(f"prefix must be {PREFIX_LEN} bytes, got {len(prefix)}")
    if prefix[:12] != SIGNATURE:
        if prefix.startswith(b"PROXY "):
            raise ProxyProtocolError("PROXY v1 (text) header; only v2 is accepted")
        raise ProxyProtocolError("bad signature")
    ver_cmd, fam_proto, length = prefix[12], prefix[13], struct.unpack("!H", prefix[14:16])[0]
    if ver_cmd >> 4 != VERSION:
        raise ProxyProtocolError(f"unsupported version {ver_cmd >> 4}")
    if ver_cmd & 0x0F not in (CMD_LOCAL, CMD_PROXY):
        raise ProxyProtocolError(f"unknown command {ver_cmd & 0x0F}")
    family, proto = fam_proto >> 4, fam_proto & 0x0F
    if family not in _ADDR_LEN:
        raise ProxyProtocolError(f"unknown address family {family}")
    if proto not in (PROTO_UNSPEC, PROTO_STREAM, PROTO_DGRAM):
        raise ProxyProtocolError(f"unknown transport protocol {proto}")
    if length > max_payload:
        raise ProxyProtocolError(f"header too large: {length} bytes (limit {max_payload})")
    if ver_cmd & 0x0F == CMD_PROXY and length < _ADDR_LEN[family]:
        raise ProxyProtocolError(f"address block too short: {length} < {_ADDR_LEN[family]}")
    return int(length)


def _tlvs(data: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyProtocolError("truncated TLV")
        kind, size = data[i], struct.unpack("!H", data[i + 1 : i + 3])[0]
        if i + 3 + size > len(data):
            raise ProxyProtocolError("truncated TLV")
        out.append((kind, data[i + 3 : i + 3 + size]))
        i += 3 + size
    return out


def parse(data: bytes, max_payload: int = MAX_PAYLOAD) -> ProxyHeader:
    """Parse one complete header (``data`` is exactly the header's bytes)."""
    length = payload_length(data[:PREFIX_LEN], max_payload)
    if len(data) != PREFIX_LEN + length:
        raise ProxyProtocolError(
            f"header is {PREFIX_LEN + length} bytes, got {len(data)}"
            + (" (truncated)" if len(data) < PREFIX_LEN + length else "")
        )
    command = "PROXY" if data[12] & 0x0F == CMD_PROXY else "LOCAL"
    family, proto = data[13] >> 4, data[13] & 0x0F
    body = data[PREFIX_LEN:]
    src: Address | None = None
    dst: Address | None = None
    name = {AF_UNSPEC: "UNSPEC", AF_UNIX: "UNIX"}.get(family, "")
    if command == "LOCAL":
        # LOCAL: the addresses (if any) are to be ignored, the rest may be TLVs
        name = name or ("TCP4" if family == AF_INET else "TCP6")
        return ProxyHeader(command, name, None, None, [], PREFIX_LEN + length)
    skip = _ADDR_LEN[family]
    if family in (AF_INET, AF_INET6):
        if proto != PROTO_STREAM:
            raise ProxyProtocolError("not a stream (TCP) connection")
        n = 4 if family == AF_INET else 16
        src_ip = ipaddress.ip_address(body[:n])
        dst_ip = ipaddress.ip_address(body[n : 2 * n])
        src_port, dst_port = struct.unpack("!HH", body[2 * n : 2 * n + 4])
        src, dst = (str(src_ip), src_port), (str(dst_ip), dst_port)
        name = "TCP4" if family == AF_INET else "TCP6"
    return ProxyHeader(command, name, src, dst, _tlvs(body[skip:]), PREFIX_LEN + length)


def build(
    source: Address | None,
    destination: Address | None = None,
    *,
    local: bool = False,
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A PROXY v2 header (for tests and tools): TCP4/TCP6 from the addresses, else UNSPEC."""
    extra = b"".join(bytes([k]) + struct.pack("!H", len(v)) + v for k, v in tlvs)
    if local or source is None:
        cmd, fam, body = CMD_LOCAL if local else CMD_PROXY, AF_UNSPEC, b""
    else:
        dst = destination or (("0.0.0.0" if ":" not in source[0] else "::"), 0)
        s_ip, d_ip = ipaddress.ip_address(source[0]), ipaddress.ip_address(dst[0])
        if s_ip.version != d_ip.version:
            raise ValueError("source and destination must be the same IP version")
        fam = AF_INET if s_ip.version == 4 else AF_INET6
        cmd = CMD_PROXY
        body = s_ip.packed + d_ip.packed + struct.pack("!HH", source[1], dst[1])
    body += extra
    proto = PROTO_STREAM if fam else PROTO_UNSPEC
    head = bytes([VERSION << 4 | cmd, fam << 4 | proto]) + struct.pack("!H", len(body))
    return SIGNATURE + head + body


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ProxyProtocolError(f"truncated header: connection closed after {len(buf)} bytes")
        buf += chunk
    return bytes(buf)


async def read_header(sock: socket.socket, max_payload: int = MAX_PAYLOAD) -> ProxyHeader:
    """Read exactly one PROXY v2 header from the non-blocking ``sock`` (nothing after it)."""
    loop = asyncio.get_running_loop()
    prefix = await _recv_exactly(loop, sock, PREFIX_LEN)
    length = payload_length(prefix, max_payload)
    rest = await _recv_exactly(loop, sock, length) if length else b""
    return parse(prefix + rest, max_payload)


# ----- trusted sources --------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_sources(values: Iterable[str]) -> list[Network]:
    """``api_proxy_sources`` entries (addresses or CIDR networks); ValueError when bad."""
    nets: list[Network] = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"api_proxy_sources: '{v}' is not an address or network") from None
    return nets


def trusted(ip: str, networks: Iterable[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(plain_ip(ip))
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in networks)


def check_pairing_config(cfg: DispatcherConfig) -> None:
    """Raise ConfigError (file:line) when ``pairing_proxy_port`` is unusable."""
    if not cfg.pairing_proxy_port:
        return
    if not 0 < cfg.pairing_proxy_port < 65536:
        raise cfg.error("pairing_proxy_port",
                        f"pairing_proxy_port {cfg.pairing_proxy_port} is not a port number")  # fmt: skip
    try:
        nets = parse_sources(cfg.api_proxy_sources)
    except ValueError as exc:
        raise cfg.error("api_proxy_sources", str(exc)) from None
    if not nets:
        raise cfg.error("api_proxy_sources",
                        "pairing_proxy_port is set but api_proxy_sources is empty")  # fmt: skip
