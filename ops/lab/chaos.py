"""Chaos on the multi-host lab (:mod:`ops.lab.deployment`): a client load through the
virtual IP from the operator's host, and the probes the chaos test reads.

* :class:`VipLoad`: ``python -m ops.lab.chaos load ...`` started on the operator's host (the
  test process, in the root namespace, cannot reach the lab: DESIGN.md section 5). It is
  :class:`ops.lab.hacluster.Load` (``POST /ping`` of every agent and ``POST /run`` of
  ``disk-usage`` on one agent in turn, a new TLS connection per attempt with the operator
  certificate, one retry) writing each outcome as a JSON line to a file of the host, which
  the test reads back as a :class:`~ops.lab.hacluster.LoadReport`. The clocks agree:
  ``time.monotonic`` is the machine's, in every namespace. Bounded in time and count; it
  stops on SIGTERM.
* :func:`leaders`: which dispatcher hosts answer ``/leader`` 200 (one probe command on a
  host the dispatchers' firewall lets in: a load balancer; every dispatcher in parallel);
  :func:`wait_leader`; :func:`api_status`: one API request straight to one instance, as
  the operator (:func:`give_operator_cert` copies its certificate to the probing host);
* :func:`cut` and :func:`heal`: a host's packets to and from others dropped (iptables rules
  inserted first in its own namespace, and exactly those deleted again: the guide's
  firewall stays as it was).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ops.lab.deployment import VIP_NAME
from ops.lab.hacluster import Load, LoadReport, Outcome
from ops.lab.hosts import Host, LabError
from ops.lab.proc import ROOT

HEALTH_PORT = 7446  # the dispatchers' health port (the default)
API_PORT = 7445
LOAD_FILE = "/root/chaos-load.jsonl"  # on the operator's host (its own /root)
OPERATOR_TLS = ("/root/ca.crt", "/root/alice.crt", "/root/alice.key")  # as the guide copies


class ScriptLoad(Load):
    """:class:`Load` for a script that takes no test-chosen output: a run is served when
    it exits 0 with some output (``disk-usage /`` prints the mount point and its use)."""

    def _attempt(self, n: int, kind: str, host: str) -> str | None:
        if kind == "ping":
            return super()._attempt(n, kind, host)
        try:
            r = self._client.post("/run", json={"hosts": [host], "script": self.script,
                                                "args": ["/"]})  # fmt: skip
        except Exception as exc:  # httpx errors: a failed attempt, recorded
            return f"{type(exc).__name__}: {exc}"
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:300]}"
        try:
            res = r.json()["results"]
        except (ValueError, KeyError, TypeError):
            return f"bad answer: {r.text[:300]}"
        one = res[0] if isinstance(res, list) and len(res) == 1 else {}
        if one.get("exit") != 0 or not str(one.get("stdout", "")).strip():
            return f"run error: {one or res}"[:300]
        return None


def _load_main(ns: argparse.Namespace) -> int:
    ctx = ssl.create_default_context(cafile=ns.ca)
    ctx.load_cert_chain(ns.cert, ns.key)
    load = ScriptLoad(ns.url, ctx, ns.hosts.split(","), script=ns.script, interval=ns.interval,
                      timeout=ns.timeout, max_seconds=ns.max_seconds,
                      max_requests=ns.max_requests)  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    written = 0
    out = Path(ns.out)
    out.write_text("")
    load.start()

    def flush() -> None:
        nonlocal written
        got = load.report().outcomes
        with out.open("a") as f:
            for o in got[written:]:
                f.write(json.dumps(dataclasses.asdict(o)) + "\n")
        written = len(got)

    deadline = time.monotonic() + ns.max_seconds + 15
    while not stop.is_set() and load.running and time.monotonic() < deadline:
        flush()
        stop.wait(0.2)
    load.stop()
    flush()
    return 0


class VipLoad:
    """The load of :func:`_load_main` on ``ops``, through ``url`` (the virtual IP's name)."""

    def __init__(self, ops: Host, url: str, hosts: Sequence[str], *, script: str = "disk-usage",
                 max_seconds: float = 90, interval: float = 0.05) -> None:  # fmt: skip
        self.ops = ops
        self.file = ops.path(LOAD_FILE)
        ca, cert, key = OPERATOR_TLS
        self.argv = [sys.executable, "-m", "ops.lab.chaos", "load", "--url", url, "--ca", ca,
                     "--cert", cert, "--key", key, "--hosts", ",".join(hosts), "--script", script,
                     "--max-seconds", str(max_seconds), "--interval", str(interval),
                     "--out", LOAD_FILE]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> VipLoad:
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()
        env = self.ops.env({"PYTHONPATH": str(ROOT)})
        self.proc = self.ops.popen(self.argv, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadReport:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return self.report()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def outcomes(self) -> list[Outcome]:
        try:
            text = self.file.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError, TypeError):  # a line being written
                out.append(Outcome(**json.loads(line)))
        return out

    def report(self, start: float | None = None, end: float | None = None) -> LoadReport:
        """Outcomes of the requests under way at some time in ``[start, end)``."""
        return LoadReport([o for o in self.outcomes() if (start is None or o.ended >= start)
                           and (end is None or o.started < end)])  # fmt: skip

    def wait_requests(self, n: int, timeout: float) -> None:
        """Wait until ``n`` more requests were answered (bounded by ``timeout``)."""
        want = len(self.outcomes()) + n
        deadline = time.monotonic() + timeout
        while len(self.outcomes()) < want:
            if not self.running:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc and \
                    self.proc.stderr else ""  # fmt: skip
                raise LabError(f"the load on {self.ops.name} stopped: {err[-800:]}")
            if time.monotonic() > deadline:
                raise LabError(f"{n} load requests not answered within {timeout} s")
            time.sleep(0.1)


# ----- probes, from a host the dispatchers' firewall lets in ------------------------------------


def give_operator_cert(ops: Host, probe: Host) -> None:
    """Copy the operator's CA, certificate and key from ``ops`` to ``probe`` (same paths)."""
    for path in OPERATOR_TLS:
        dst = probe.path(path)
        dst.write_bytes(ops.path(path).read_bytes())
        dst.chmod(0o600)


def _rules(others: Sequence[Host]) -> list[list[str]]:
    return [r for o in others for r in (["INPUT", "-s", o.address, "-j", "DROP"],
                                        ["OUTPUT", "-d", o.address, "-j", "DROP"])]  # fmt: skip


def cut(host: Host, others: Sequence[Host]) -> None:
    """Drop every packet between ``host`` and ``others`` (rules first in its chains)."""
    for rule in _rules(others):
        host.run(["iptables", "-w", "-I", *rule])


def heal(host: Host, others: Sequence[Host]) -> None:
    """Undo :func:`cut` (its rules only)."""
    for rule in _rules(others):
        host.run(["iptables", "-w", "-D", *rule], check=False)


def leaders(probe: Host, dispatchers: Sequence[Host]) -> list[str]:
    """The dispatcher hosts whose ``/leader`` answers 200 now (probed in parallel)."""
    probes = " ".join(
        f"( code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 1 "
        f"http://{h.fqdn}:{HEALTH_PORT}/leader); echo {h.name} $code ) &"
        for h in dispatchers
    )
    got = probe.run(f"{probes} wait", check=False, timeout=10)
    return sorted(ln.split()[0] for ln in got.stdout.splitlines() if ln.split()[1:] == ["200"])


def wait_leader(probe: Host, dispatchers: Sequence[Host], timeout: float,
                not_: str = "") -> tuple[str, float]:  # fmt: skip
    """The one leader (other than ``not_``) and the seconds it took to see it."""
    t0 = time.monotonic()
    while True:
        got = [n for n in leaders(probe, dispatchers) if n != not_]
        if len(got) == 1:
            return got[0], time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise LabError(f"no single leader (but {not_ or 'none'}) after {timeout} s: {got}")
        time.sleep(0.05)


def api_status(probe: Host, host: Host, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """One API request straight to ``host``'s instance as the operator: status and body."""
    ca, cert, key = OPERATOR_TLS
    t0 = time.monotonic()
    got = probe.run(["curl", "-sS", "--max-time", "30", "-X", method, "--cacert", ca, "--cert",
                   cert, "--key", key, "-w", "\n%{http_code}", "--connect-to",
                   f"{VIP_NAME}:{API_PORT}:{host.fqdn}:{API_PORT}",  # the name its cert carries
                   f"https://{VIP_NAME}:{API_PORT}{path}"], check=False, timeout=45)  # fmt: skip
    body, _, code = got.stdout.rpartition("\n")
    if not code.isdigit() or code == "000":  # no answer: say why
        return 0, {"curl": got.stderr.strip()[-300:], "seconds": round(time.monotonic() - t0, 1)}
    try:
        doc = json.loads(body) if body.strip() else {}
    except ValueError:
        doc = {"raw": body[:300]}
    return int(code) if code.isdigit() else 0, doc if isinstance(doc, dict) else {"doc": doc}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.lab.chaos")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ld = sub.add_parser("load", help="a client load through a URL; outcomes as JSON lines")
    ld.add_argument("--url", required=True)
    ld.add_argument("--ca", required=True)
    ld.add_argument("--cert", required=True)
    ld.add_argument("--key", required=True)
    ld.add_argument("--hosts", required=True)
    ld.add_argument("--script", default="disk-usage")
    ld.add_argument("--out", required=True)
    ld.add_argument("--interval", type=float, default=0.05)
    ld.add_argument("--timeout", type=float, default=10.0)
    ld.add_argument("--max-seconds", type=float, default=90.0)
    ld.add_argument("--max-requests", type=int, default=5000)
    ns = parser.parse_args(argv)
    return _load_main(ns)


if __name__ == "__main__":
    sys.exit(main())
