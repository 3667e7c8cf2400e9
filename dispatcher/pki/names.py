"""The names the dispatcher/API certificate carries (its subjectAltName).

Clients reach the API by the load balancers' name (``api_names``) and by each host's own
name; without a name in the certificate every client needs a ``server_name`` override. The
certificate is shared by the instances (it travels with ``/etc/ctrl-exec``), so
``api_names`` should list every name clients use: the service name of the virtual IP and
each dispatcher host's FQDN. Left empty, it is the issuing host's FQDN, short name and
addresses (a single-host setup works at once).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from dispatcher.config import DispatcherConfig


def host_names() -> list[str]:
    """This host's FQDN, short name and addresses (loopback left out)."""
    out: list[str] = []
    fqdn, short = socket.getfqdn(), socket.gethostname()
    for name in (fqdn, short):
        if name and name not in out and name != "localhost":
            out.append(name)
    try:
        infos = socket.getaddrinfo(fqdn, None)
    except OSError:
        infos = []
    for info in infos:
        addr = str(info[4][0])
        if not ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback and addr not in out:
            out.append(addr)
    return out


def cert_names(cfg: DispatcherConfig) -> list[str]:
    """The certificate's common name (clients that verify the name upstream's certificate
    carries keep working), then ``api_names`` when set, else :func:`host_names`."""
    from dispatcher.pki.ca import DISPATCHER_CN

    return [DISPATCHER_CN, *(cfg.api_names or host_names())]


def san_entries(names: Sequence[str]) -> list[tuple[str, str]]:
    """``("ip", addr)`` or ``("dns", name)`` for each name, in order, without duplicates."""
    out: list[tuple[str, str]] = []
    for name in names:
        try:
            entry = ("ip", str(ipaddress.ip_address(name)))
        except ValueError:
            entry = ("dns", name.lower().rstrip("."))
        if entry not in out:
            out.append(entry)
    return out
