"""What happened on each host of a run or ping, for whoever watches (the API's metrics).

:func:`classify` turns one per-host result of :mod:`dispatcher.client.fanout` into one of
:data:`OUTCOMES`:

* ``ok``: the agent ran the script with exit 0 (sync), accepted it (async), or answered
  the ping;
* ``failed``: the agent ran the script and it exited non-zero (or timed out there);
* ``unreachable``: no answer from the agent (refused, timed out, no route, name not
  resolved, TLS handshake or certificate pin refused);
* ``denied``: refused by an auth hook (the dispatcher's or the agent's) or the agent's
  allowlist;
* ``locked``: the host:script was already running;
* ``error``: anything else (a bad answer, a read timeout after connecting, ...).

:class:`RunObserver` is what :func:`dispatcher.operations.do_run` and ``do_ping`` report
to (``Dispatcher.observer``; None in ``ced``). Standard library only: ``ced run`` imports
this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

OUTCOMES = ("ok", "failed", "unreachable", "denied", "locked", "error")

_UNREACHABLE = (
    "host '",  # did not respond / did not resolve / is unreachable (wire.transport_error)
    "TLS handshake with",
    "agent certificate",  # a pin mismatch (dispatcher.client.pins)
    "agent presented no certificate",
    "500 Server closed connection without sending any data back",
)
_DENIED = ("script not permitted", "not authorised", "forbidden")
_LOCKED = ("script already running", "409")
_RTT_RE = re.compile(r"^(\d+(?:\.\d+)?)ms$")


class RunObserver(Protocol):
    """Told once per host of every run and ping this instance carries out."""

    def observe(self, kind: str, script: str, host: str, outcome: str, seconds: float) -> None:
        """``kind`` is ``run`` or ``ping`` (``script`` is "" for a ping)."""
        ...


def _from_error(error: str) -> str:
    if error.startswith(_UNREACHABLE):
        return "unreachable"
    if error.startswith(_DENIED):
        return "denied"
    if error.startswith(_LOCKED):
        return "locked"
    return "error"


def classify(res: Mapping[str, Any]) -> str:
    """The outcome (one of :data:`OUTCOMES`) of one host's run, async submission or ping."""
    error = res.get("error")
    error = error if isinstance(error, str) else ""
    if "exit" in res:  # a synchronous run
        code = res.get("exit")
        if "stdout" in res:  # the agent ran the script
            return "ok" if code == 0 and not error else "failed"
        if code == 0 and not error:
            return "ok"
        return _from_error(error) if error else "failed"
    status = res.get("status")
    if status in ("ok", "accepted", "running", "done"):
        return "ok"
    if status == "busy":
        return "locked"
    return _from_error(error)


def seconds_of(res: Mapping[str, Any], fallback: float) -> float:
    """The host's round trip (``rtt`` as ``<n>ms``) in seconds, else ``fallback``."""
    rtt = res.get("rtt")
    m = _RTT_RE.match(rtt) if isinstance(rtt, str) else None
    return float(m.group(1)) / 1000 if m else max(0.0, fallback)


def report(
    observer: RunObserver | None,
    kind: str,
    script: str,
    results: Iterable[Mapping[str, Any]],
    elapsed: float,
) -> None:
    """Tell ``observer`` the outcome of every host in ``results`` (never raises)."""
    if observer is None:
        return
    for res in results:
        try:
            observer.observe(kind, script, str(res.get("host", "")), classify(res),
                             seconds_of(res, elapsed))  # fmt: skip
        except Exception:  # metrics never change an operation's result
            continue


def report_all(
    observer: RunObserver | None,
    kind: str,
    script: str,
    hosts: Iterable[str],
    outcome: str,
    elapsed: float,
) -> None:
    """Tell ``observer`` one ``outcome`` for every host (refused before any agent call)."""
    if observer is None:
        return
    for host in hosts:
        try:
            observer.observe(kind, script, host, outcome, max(0.0, elapsed))
        except Exception:
            continue
