"""The lab's port picker stays out of the kernel's ephemeral range (where every outgoing
connection's source port comes from), never gives a port twice, and gives bindable ones."""

from __future__ import annotations

import socket

from ops.lab import net


def test_ports_are_below_the_ephemeral_range_distinct_and_free() -> None:
    low = net._ephemeral_low()
    ports = [net.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(net.PICK_FROM <= p < low for p in ports), (low, ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
