"""Peer addresses as the dispatcher compares, logs and stores them."""

from __future__ import annotations

import ipaddress


def plain_ip(ip: str, *, keep_zone: bool = False) -> str:
    """``ip`` in canonical form: IPv4-mapped IPv6 as IPv4, no brackets, no zone id.

    With ``keep_zone`` a link-local address keeps its zone (``fe80::1%eth0``), so it can
    still be connected to; an IPv4-mapped address never has one. Anything that is not an
    IP address comes back unchanged.
    """
    if ip.startswith("[") and ip.endswith("]"):
        inner = ip[1:-1]
        if ":" in inner:  # only IPv6 is written in brackets
            ip = inner
    address, sep, zone = ip.partition("%")
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if keep_zone and sep and zone:
            return f"{addr}%{zone}"
    return str(addr)
