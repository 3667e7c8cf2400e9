"""The plain-HTTP health port of an instance (DESIGN.md sections 3 and 6).

``GET /health``, ``/ready``, ``/leader`` answer 200 or 503 with a small JSON body saying
why; ``GET /status`` is one JSON object with at least ``instance_id``, ``role``,
``leader_id``, ``epoch``, ``lease_ttl``, ``lease_time_left``, ``leader_since`` (when this
instance took the lead, ISO 8601 UTC with milliseconds; null unless it leads),
``generation``, ``cert_serial``, ``etcd`` and ``last_tick_at``. No secrets, no auth:
HAProxy and runbooks read it.

* ``/health``: the instance can serve run/ping: the API listener is up, the instance is
  not draining, and the event loop ticked recently.
* ``/ready``: ``/health`` plus the dispatcher certificate and key are readable (without
  them no agent call can succeed) and, in a cluster, the instance runs the cluster's
  current generation (never on a timer: a diverged instance stays out until it converges;
  ``/status`` says why under ``sync``). ``/ready?drain=404`` answers 404 instead of 503 while
  the instance drains or is not in sync: with HAProxy's ``http-check disable-on-404`` the
  server then takes no new connections while established ones finish (a 503 would mark it
  down and ``on-marked-down shutdown-sessions`` would cut requests in flight: an ex-leader
  cut off from etcd did so to its runs). A broken instance (event loop stalled, certificate
  unreadable) still answers 503: its sessions are cut.
* ``/leader``: 200 only while this instance holds the lease with time to spare.
* ``/metrics``: the API's Prometheus registry (:mod:`dispatcher.api.opsmetrics`), so
  Prometheus scrapes without an operator certificate; 404 when the daemon gave none.

Who leads comes from a :class:`RoleProvider`. Until the cluster layer plugs in its etcd
implementation, :class:`LocalRole` is the embedded single-host backend: always the
leader, epoch 1.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dispatcher.config import DispatcherConfig
from dispatcher.ha.role import RoleSnapshot

TICK_INTERVAL = 1.0
STALE_TICKS = 5  # /health fails when the loop has not ticked for this many intervals
LEADER_SPARE = 0.25  # /leader needs more than this fraction of the TTL left


def iso_utc(t: float, ms: bool = False) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` (ISO 8601, UTC) of a Unix time; ``.mmm`` before the ``Z``
    with ``ms``."""
    frac = f".{int(t * 1000) % 1000:03d}" if ms else ""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t))}{frac}Z"


class RoleProvider(Protocol):
    """The coordination backend as the health port sees it (local or etcd)."""

    def snapshot(self) -> RoleSnapshot: ...

    def tick(self) -> None:
        """Called every :data:`TICK_INTERVAL` by the daemon's loop."""
        ...

    def resign(self) -> None:
        """Give up leadership (SIGTERM): a peer takes over at once."""
        ...


class LocalRole:
    """Embedded single-host backend: always the leader, epoch 1, lease never expires."""

    def __init__(self, instance_id: str, lease_ttl: float) -> None:
        self.instance_id = instance_id
        self.lease_ttl = lease_ttl
        self.resigned = False
        self.started = time.time()  # the embedded backend leads from the start

    def snapshot(self) -> RoleSnapshot:
        leading = not self.resigned
        return RoleSnapshot(
            instance_id=self.instance_id,
            role="leader" if leading else "unknown",
            leader_id=self.instance_id if leading else None,
            epoch=1,
            lease_ttl=self.lease_ttl if leading else None,
            lease_time_left=self.lease_ttl if leading else None,
            generation=0,
            etcd="ok",
            backend="local",
            leader_since=self.started if leading else None,
        )

    def tick(self) -> None:
        return None

    def resign(self) -> None:
        self.resigned = True


@dataclass
class InstanceState:
    """Lifecycle of this instance, set by the daemon."""

    serving: bool = False  # the API listener is up
    draining: bool = False  # SIGTERM received: finishing in-flight requests
    last_tick: float | None = None  # time.time() of the last loop tick
    # in a cluster: the serial this process presents (it loaded), whether its certificate
    # files changed since, and why it is not ready yet (first sync)
    presented_serial: Callable[[], str] | None = None
    restart_pending: Callable[[], bool] | None = None
    not_ready: Callable[[], str | None] | None = None
    sync_view: Callable[[], dict[str, Any]] | None = None  # /status "sync"
    _serial_cache: dict[str, Any] = field(default_factory=dict)

    def ticked(self) -> None:
        self.last_tick = time.time()


def cert_serial(path: str, cache: dict[str, Any] | None = None) -> str | None:
    """Lower-case hex serial of the certificate at ``path`` (cached by mtime and size)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_mtime_ns, st.st_size)
    if cache is not None and cache.get("key") == key:
        return cache.get("serial")
    from dispatcher.pki.ca import cert_serial_hex

    try:
        serial: str | None = cert_serial_hex(path)
    except (OSError, ValueError):
        serial = None
    if cache is not None:
        cache.update(key=key, serial=serial)
    return serial


def _readable(*paths: str) -> str | None:
    """The first path that cannot be opened for reading, else None."""
    for p in paths:
        try:
            with open(p, "rb"):
                pass
        except OSError:
            return p
    return None


def status_document(
    cfg: DispatcherConfig, role: RoleProvider, state: InstanceState
) -> dict[str, Any]:
    snap = role.snapshot()
    serial = state.presented_serial() if state.presented_serial is not None else None
    return {
        "instance_id": snap.instance_id,
        "role": snap.role,
        "leader_id": snap.leader_id,
        "epoch": snap.epoch,
        "lease_ttl": snap.lease_ttl,
        "lease_time_left": snap.lease_time_left,
        "leader_since": iso_utc(snap.leader_since, ms=True) if snap.leader_since else None,
        "generation": snap.generation,
        "cert_serial": serial or cert_serial(cfg.cert, state._serial_cache),
        "etcd": snap.etcd,
        "last_tick_at": iso_utc(state.last_tick) if state.last_tick is not None else None,
        "backend": snap.backend,
        "serving": state.serving,
        "draining": state.draining,
        "restart_pending": bool(state.restart_pending()) if state.restart_pending else False,
        "sync_mode": cfg.sync_mode if snap.backend == "etcd" else "local",
        "sync": state.sync_view() if state.sync_view is not None else None,
    }


def _health_problem(state: InstanceState, now: float) -> str | None:
    if state.draining:
        return "draining"
    if not state.serving:
        return "starting"
    if state.last_tick is None or now - state.last_tick > STALE_TICKS * TICK_INTERVAL:
        return "event loop stalled"
    return None


def _answer(problem: str | None, ok_status: str, **extra: Any) -> JSONResponse:
    if problem is None:
        return JSONResponse({"ok": True, "status": ok_status, **extra})
    return JSONResponse({"ok": False, "status": "unavailable", "reason": problem, **extra}, 503)


def _leader_problem(snap: RoleSnapshot, state: InstanceState) -> str | None:
    if state.draining:
        return "draining"
    if snap.role != "leader":
        return f"role is {snap.role}"
    if (
        snap.lease_ttl is not None
        and snap.lease_time_left is not None
        and snap.lease_time_left <= snap.lease_ttl * LEADER_SPARE
    ):
        return "lease about to expire"
    return None


@dataclass(frozen=True)
class HealthPort:
    """What the health routes read (``app.state.port``)."""

    cfg: DispatcherConfig
    role: RoleProvider
    state: InstanceState
    metrics: CollectorRegistry | None = None


async def _port(request: Request) -> HealthPort:
    port: HealthPort = request.app.state.port
    return port


PortDep = Annotated[HealthPort, Depends(_port)]
router = APIRouter()


@router.get("/health")
async def health(port: PortDep) -> JSONResponse:
    return _answer(_health_problem(port.state, time.time()), "serving")


@router.get("/ready")
async def ready(request: Request, port: PortDep) -> JSONResponse:
    cfg, state = port.cfg, port.state
    problem = _health_problem(state, time.time())
    if problem is None:
        missing = _readable(cfg.cert, cfg.key)
        if missing is not None:
            problem = f"cannot read {missing}"
    soft = problem == "draining"
    if problem is None and state.not_ready is not None:
        problem = state.not_ready()
        soft = problem is not None  # not in sync: the runs it serves now are still sound
    answer = _answer(problem, "ready")
    if soft and request.query_params.get("drain") == "404":
        answer.status_code = 404  # HAProxy disable-on-404: soft stop, sessions finish
    return answer


@router.get("/leader")
async def leader(port: PortDep) -> JSONResponse:
    snap = port.role.snapshot()
    extra = {"role": snap.role, "epoch": snap.epoch, "lease_time_left": snap.lease_time_left}
    return _answer(_leader_problem(snap, port.state), "leader", **extra)


@router.get("/status")
async def status(port: PortDep) -> JSONResponse:
    return JSONResponse(status_document(port.cfg, port.role, port.state))


@router.get("/metrics")
async def metrics(port: PortDep) -> Response:
    if port.metrics is None:
        return JSONResponse({"ok": False, "status": "unavailable", "reason": "no metrics"}, 404)
    body = await asyncio.to_thread(generate_latest, port.metrics)  # collectors read files
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def create_health_app(
    cfg: DispatcherConfig, role: RoleProvider, state: InstanceState,
    metrics: CollectorRegistry | None = None,
) -> FastAPI:  # fmt: skip
    """The health-port application (no OpenAPI document, no auth); ``metrics``: the
    registry ``GET /metrics`` serves."""
    app = FastAPI(title="ctrl-exec-health", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.port = HealthPort(cfg, role, state, metrics)
    app.router.routes.extend(router.routes)  # see dispatcher.api.app.add_routes
    return app
