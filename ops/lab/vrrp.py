"""keepalived on lab hosts: two load balancers sharing a virtual IP (:mod:`ops.lab.hosts`).

The configuration is the product's (``ced cluster keepalived-config``, i.e.
:func:`dispatcher.keepalived.render`); keepalived runs in the foreground on its host with
its pid files in the host's own ``/run``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence

from ops.lab.hosts import Host, LabError

CONF = "/etc/ctrl-exec/keepalived.conf"  # inside the host's mount namespace


def start(host: Host, conf_text: str) -> subprocess.Popen[bytes]:
    """Write ``conf_text`` on ``host``, check it with ``keepalived -t``, start keepalived."""
    host.path("/etc/ctrl-exec").joinpath("keepalived.conf").write_text(conf_text)
    host.run(["keepalived", "-t", "-f", CONF])
    log = open(host.path("/var/log/ctrl-exec") / "keepalived.log", "ab")  # noqa: SIM115
    return host.popen(
        ["keepalived", "--dont-fork", "--log-console", "--vrrp", "-f", CONF,
         "-p", "/run/keepalived.pid", "-r", "/run/keepalived_vrrp.pid"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def holders(hosts: Sequence[Host], vip: str) -> list[Host]:
    """The hosts that have ``vip`` on an interface right now."""
    found = []
    for h in hosts:
        got = h.run(["ip", "-4", "-o", "addr", "show"], check=False)
        if any(f" {vip}/" in line for line in got.stdout.splitlines()):
            found.append(h)
    return found


def wait_holder(hosts: Sequence[Host], vip: str, want: Host, timeout: float = 15) -> float:
    """Seconds until ``want`` (and only it) holds ``vip``."""
    t0 = time.monotonic()
    while True:
        got = holders(hosts, vip)
        if got == [want]:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            names = [h.name for h in got]
            raise LabError(f"{vip} held by {names or 'nobody'}, not {want.name}, after {timeout} s")
        time.sleep(0.05)
