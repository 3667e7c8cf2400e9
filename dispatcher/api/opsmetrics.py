"""What an on-call engineer watches on one instance, on ``/metrics`` of the API and of the
health port (``ops/monitoring/alerts.yml`` and ``grafana-dashboard.json`` use these).

Run and ping outcomes (:class:`RunMetrics`, the ``Dispatcher.observer`` of the daemon; the
outcomes are :data:`dispatcher.runoutcome.OUTCOMES`):

* ``ctrl_exec_runs_total{script,outcome}`` and the histogram
  ``ctrl_exec_run_duration_seconds{script,outcome}``, one per host of each run. Script
  labels are bounded: a name becomes a label once an agent ran it (outcome ``ok`` or
  ``failed``, so it is in an allowlist), up to ``max_scripts`` names; anything else is
  ``other`` (a caller cannot grow the label set with made-up names);
* ``ctrl_exec_pings_total{outcome}``, ``ctrl_exec_ping_duration_seconds{outcome}``;
* ``ctrl_exec_agents_unreachable``: registered agents whose last run or ping from this
  instance found them unreachable;
* ``ctrl_exec_agent_last_contact_timestamp_seconds{host}``: the last answer from each
  agent this instance reached, only while the registry holds at most ``max_hosts``
  agents (bounded cardinality).

Read at scrape time (:class:`OpsCollector`):

* ``ctrl_exec_build_info{version,python}`` 1;
* ``ctrl_exec_cert_expiry_timestamp_seconds{kind,name}``: notAfter of the CA (``ca``),
  the dispatcher certificate (``dispatcher``), the operator CA (``operator``, when set
  up) and every registered agent (``agent``, the registry record's ``expiry``, written at
  approval and renewal). Files are parsed with the standard library
  (:mod:`agent.certinfo`) and cached by mtime, records too;
* ``ctrl_exec_pairing_requests_pending`` and ``ctrl_exec_pairing_queue_max``;
* ``ctrl_exec_restart_pending``: 1 while the certificate/key/CA files differ from what
  this process loaded (it restarts when the leader orders it).
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.allowlist import NAME_RE
from agent.certinfo import not_after
from agent.common.datefmt import parse_openssl_date
from agent.version import __version__
from dispatcher.core import Dispatcher
from dispatcher.runoutcome import OUTCOMES

MAX_SCRIPTS = 200
OTHER = "other"
MAX_TRACKED = 100_000  # hosts remembered for the unreachable gauge (the registry bounds it)
# seconds: a ping is milliseconds, a run up to read_timeout (and beyond, async)
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class RunMetrics(Collector):
    """The daemon's :class:`~dispatcher.runoutcome.RunObserver`, registered in
    ``registry`` (its counters, and itself as the collector of the contact gauges)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        names: Callable[[], list[str]],
        max_hosts: int,
        max_scripts: int = MAX_SCRIPTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._names = names  # the registered agents, now
        self.max_hosts = max_hosts
        self.max_scripts = max_scripts
        self._clock = clock
        self._lock = threading.Lock()
        self._scripts: set[str] = set()
        self._unreachable: set[str] = set()
        self._last_ok: dict[str, float] = {}
        self.runs = Counter("ctrl_exec_runs", "Hosts of runs by script and outcome",
                            ["script", "outcome"], registry=registry)  # fmt: skip
        self.run_seconds = Histogram(
            "ctrl_exec_run_duration_seconds", "Seconds per host of a run, by script and outcome",
            ["script", "outcome"], buckets=BUCKETS, registry=registry,
        )  # fmt: skip
        self.pings = Counter("ctrl_exec_pings", "Hosts of pings by outcome", ["outcome"],
                             registry=registry)  # fmt: skip
        self.ping_seconds = Histogram("ctrl_exec_ping_duration_seconds",
                                      "Seconds per host of a ping, by outcome", ["outcome"],
                                      buckets=BUCKETS, registry=registry)  # fmt: skip
        for outcome in OUTCOMES:  # every outcome is a series from the start
            self.pings.labels(outcome)
        registry.register(self)

    def script_label(self, script: str, outcome: str) -> str:
        with self._lock:
            if script in self._scripts:
                return script
            if (
                outcome in ("ok", "failed")
                and NAME_RE.match(script)
                and len(self._scripts) < self.max_scripts
            ):
                self._scripts.add(script)
                return script
        return OTHER

    def observe(self, kind: str, script: str, host: str, outcome: str, seconds: float) -> None:
        outcome = outcome if outcome in OUTCOMES else "error"
        if kind == "run":
            label = self.script_label(script, outcome)
            self.runs.labels(label, outcome).inc()
            self.run_seconds.labels(label, outcome).observe(seconds)
        else:
            self.pings.labels(outcome).inc()
            self.ping_seconds.labels(outcome).observe(seconds)
        self._contact(host, outcome)

    def _contact(self, host: str, outcome: str) -> None:
        if not host:
            return
        with self._lock:
            if outcome == "unreachable":
                if len(self._unreachable) < MAX_TRACKED:
                    self._unreachable.add(host)
                return
            self._unreachable.discard(host)
            if host in self._last_ok or len(self._last_ok) < MAX_TRACKED:
                self._last_ok[host] = self._clock()

    def collect(self) -> Iterator[Metric]:
        names = self._names()
        registered = set(names)
        with self._lock:
            down = len(self._unreachable & registered)
            last = {h: t for h, t in self._last_ok.items() if h in registered}
        yield GaugeMetricFamily(
            "ctrl_exec_agents_unreachable",
            "Registered agents whose last run or ping from this instance found them unreachable",
            value=down,
        )
        contact = GaugeMetricFamily(
            "ctrl_exec_agent_last_contact_timestamp_seconds",
            "Unix time of the last answer from each agent this instance reached "
            "(only while the registry holds at most max_hosts agents)",
            labels=["host"],
        )
        if len(names) <= self.max_hosts:
            for host in sorted(last):
                contact.add_metric([host], last[host])
        yield contact

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _ExpiryCache:
    """notAfter (Unix time) of files and registry records, re-read when they change."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[tuple[int, int], float | None]] = {}

    def _stamp(self, path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def cert(self, path: str) -> float | None:
        return self._cached(path, lambda: not_after(path).timestamp())

    def record(self, path: str) -> float | None:
        def read() -> float | None:
            import json

            rec = json.loads(Path(path).read_bytes())
            expiry = rec.get("expiry") if isinstance(rec, dict) else None
            if not isinstance(expiry, str) or not expiry.strip():
                return None
            return parse_openssl_date(expiry).timestamp()

        return self._cached(path, read)

    def _cached(self, path: str, read: Callable[[], float | None]) -> float | None:
        stamp = self._stamp(path)
        if stamp is None:
            self._files.pop(path, None)
            return None
        hit = self._files.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:
            value = read()
        except (OSError, ValueError, IndexError):
            value = None
        self._files[path] = (stamp, value)
        return value

    def forget_except(self, keep: set[str]) -> None:
        for path in [p for p in self._files if p not in keep]:
            del self._files[path]


class OpsCollector(Collector):
    """Build info, certificate expiry, the pairing queue and ``restart_pending``."""

    def __init__(self, d: Dispatcher, restart_pending: Callable[[], bool] | None = None) -> None:
        self.d = d
        self.restart_pending = restart_pending
        self._cache = _ExpiryCache()
        self._lock = threading.Lock()

    def _certs(self) -> list[tuple[str, str, str]]:
        cfg = self.d.cfg
        out = [("ca", "ca", cfg.ca), ("dispatcher", cfg.dispatcher_id or "dispatcher", cfg.cert)]
        operator = os.path.join(cfg.ca_dir, "operator-ca.crt")
        if os.path.exists(operator):
            out.append(("operator", "operator-ca", operator))
        return out

    def collect(self) -> Iterator[Metric]:
        yield self._build_info()
        yield self._expiry()
        yield from self._pairing()
        yield GaugeMetricFamily(
            "ctrl_exec_restart_pending",
            "1 while certificate/key/CA files differ from what this process loaded",
            value=1 if self.restart_pending is not None and self.restart_pending() else 0,
        )

    def _build_info(self) -> GaugeMetricFamily:
        info = GaugeMetricFamily("ctrl_exec_build_info",
                                 "Version of ctrl-exec and Python this instance runs",
                                 labels=["version", "python"])  # fmt: skip
        info.add_metric([__version__, platform.python_version()], 1)
        return info

    def _expiry(self) -> GaugeMetricFamily:
        fam = GaugeMetricFamily(
            "ctrl_exec_cert_expiry_timestamp_seconds",
            "notAfter (Unix time) of the CA, dispatcher, operator CA and agent certificates",
            labels=["kind", "name"],
        )
        reg = self.d.registry
        with self._lock:
            seen: set[str] = set()
            for kind, name, path in self._certs():
                seen.add(path)
                ts = self._cache.cert(path)
                if ts is not None:
                    fam.add_metric([kind, name], ts)
            for name in reg.names():
                path = str(reg.path_of(name))
                seen.add(path)
                ts = self._cache.record(path)
                if ts is not None:
                    fam.add_metric(["agent", name], ts)
            self._cache.forget_except(seen)
        return fam

    def _pairing(self) -> Iterator[Metric]:
        from dispatcher.pairing.queue import count

        cfg = self.d.cfg
        yield GaugeMetricFamily("ctrl_exec_pairing_requests_pending",
                                "Pairing requests waiting for approval (this instance's queue)",
                                value=count(cfg.pairing_dir))  # fmt: skip
        yield GaugeMetricFamily("ctrl_exec_pairing_queue_max",
                                "Most pairing requests the queue holds (pairing_max_queue)",
                                value=cfg.pairing_max_queue)  # fmt: skip

    def describe(self) -> Iterator[Metric]:
        return iter(())


def install(
    registry: CollectorRegistry,
    d: Dispatcher,
    restart_pending: Callable[[], bool] | None = None,
) -> RunMetrics:
    """Register the run metrics (and make them ``d.observer``) and the scrape-time ones."""
    runs = RunMetrics(registry, d.registry.names, d.cfg.max_hosts)
    d.observer = runs
    registry.register(OpsCollector(d, restart_pending))
    return runs
