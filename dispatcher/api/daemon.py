"""``ctrl-exec-api [--config PATH]``: the instance daemon (API port plus health port).

Two ``uvicorn.Server`` objects share one event loop: the API on ``api_bind:api_port``
(TLS when ``api_cert`` and ``api_key`` are set, with operator client certificates checked
against ``api_client_ca`` when that is set; plain HTTP otherwise, as upstream) and the
plain-HTTP health port on ``health_bind:health_port``.

Cluster (``dispatcher.ha``): the instance joins the cluster of its config (etcd, or the
embedded local backend): campaigns for the lease, registers its member record, serves
``/leader`` and ``/status`` from the elector, runs the pairing listener only while it
leads, and writes shared state only through the fenced writer.

Signals are ours, not uvicorn's: SIGTERM/SIGINT drain (``/ready`` turns 503 at once, the
election lease is revoked so a peer takes over at once, the pairing listener stops, the
instance keeps serving for ``drain_wait`` seconds so the load balancer stops sending new
connections, then the listeners close, in-flight requests finish up to ``read_timeout`` +
5 s, and the session lease with the member key and run locks is revoked) and exit 0;
SIGHUP reloads the API certificate into the live ``SSLContext`` (the next handshake
presents it; no listener is dropped) and keeps the old one if the new pair is bad.

Restart ordered by the leader (after a generation that changed certificates, see
:mod:`dispatcher.ha.restart`): the instance drains (``/ready`` 503, or 404 for
``?drain=404``; every API response says ``Connection: close``), keeps serving for
``drain_wait`` seconds so the load balancer stops sending new connections, then shuts
down as on SIGTERM (in-flight requests finish, leases revoked) and re-executes itself
with the same command line, so it loads the new certificates and CA.

Exit status: 0 after a SIGTERM/SIGINT drain; 78 (``EX_CONFIG``) on every configuration
error, each naming ``file:line`` on stderr without a traceback: a config rule
(:func:`dispatcher.config.load` and :func:`~dispatcher.config.instance_problems`), a
listening port in use (the API, health and PROXY ports are bound before the instance
joins the cluster), or a cluster identity taken by another live process (its
``instance_id``, or its ``advertise_url``, see :class:`cluster.session.Session`), also when
found later while running; 1 when a server stopped by itself. ``--check-config``
validates without starting (exit 0 or 78).

Peers: with etcd the API also verifies client certificates issued by the dispatcher CA
(``ca``), so followers can fetch generation files (``sync_mode = push``) and forward
leader-only requests with the dispatcher certificate (``GET /cluster/files/...``, authorised by the serial only, never
by the auth hook). Only certificates of the operator CA (and ``api_client_ca``) give an
operator identity; any other certificate is refused outside the peer routes, unless it
carries a dispatcher serial of the cluster (a peer forwarding to the leader).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from agent.common import logfmt, sdnotify
from agent.common.errors import ConfigError
from agent.version import __version__
from cluster.errors import AccessDenied, MemberConflict
from dispatcher.api import proxyproto
from dispatcher.api.healthport import (
    TICK_INTERVAL,
    InstanceState,
    LocalRole,
    RoleProvider,
    create_health_app,
)
from dispatcher.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    DispatcherConfig,
    default_config_path,
    instance_problems,
    instance_warnings,
)
from dispatcher.core import Dispatcher, open_dispatcher

if TYPE_CHECKING:
    from dispatcher.ha.node import HANode
    from dispatcher.pairing.supervisor import PairingSupervisor

IDENT = "ctrl-exec-api"
EX_CONFIG = 78  # sysexits.h: every configuration error, a port in use, a taken instance_id


def api_tls_enabled(cfg: DispatcherConfig) -> bool:
    return bool(cfg.api_cert and cfg.api_key)


def build_ssl(cfg: DispatcherConfig) -> ssl.SSLContext | None:
    """The API server context (None for plain HTTP); raises ConfigError if unusable.

    Client certificates are verified against the operator CA (``<ca_dir>/operator-ca.crt``,
    when set up) and ``api_client_ca`` (when set; never a CA that signs agents:
    :func:`~dispatcher.api.operatorcerts.check_client_ca`): optional, or required with
    ``api_require_client_cert``. Their CN, serial and issuer become the operator identity.
    In a cluster the dispatcher CA verifies too (peers present the dispatcher cert to
    fetch files and to forward leader-only requests): the gate lets such a certificate
    through only on the peer routes or with a dispatcher serial of the cluster, never as
    an operator (an agent's certificate is refused with 403).
    """
    from dispatcher.api.operatorcerts import check_client_ca, no_trust_problem, operator_cas

    problem = no_trust_problem(cfg)
    if problem is not None:
        raise problem
    if not api_tls_enabled(cfg):
        return None
    from agent.common.tlsconf import server_context

    for key in ("api_cert", "api_key", "api_client_ca"):
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise cfg.error(key, f"{key} {path} does not exist")
    check_client_ca(cfg)
    cas = operator_cas(cfg)
    # peers present the dispatcher cert (file fetches, requests forwarded to the leader)
    if cfg.etcd_endpoints and cfg.ca and os.path.abspath(cfg.ca) not in map(os.path.abspath, cas):
        cas.append(cfg.ca)
    try:
        ctx = server_context(
            cfg.api_cert, cfg.api_key, ca=cas[0] if cas else None,
            require_client_cert=cfg.api_require_client_cert,
        )  # fmt: skip
        for extra in cas[1:]:
            ctx.load_verify_locations(cafile=extra)
        return ctx
    except (OSError, ssl.SSLError) as exc:
        raise cfg.error("api_cert", f"cannot load the API certificate: {exc}") from None


def reload_cert(
    cfg: DispatcherConfig, ctx: ssl.SSLContext | None, ha: HANode | None = None
) -> bool:
    """SIGHUP: load ``api_cert``/``api_key`` into the live context; False keeps the old."""
    ok = _reload_cert(cfg, ctx)
    if ok and ha is not None and ha.sync is not None:
        ha.sync.reloaded()
    return ok


def _reload_cert(cfg: DispatcherConfig, ctx: ssl.SSLContext | None) -> bool:
    if ctx is None:
        logfmt.event("reload", result="skip", reason="plain HTTP, no certificate")
        return False
    try:
        ctx.load_cert_chain(cfg.api_cert, cfg.api_key)
    except (OSError, ssl.SSLError) as exc:
        logfmt.event("reload", logging.ERROR, result="error", error=exc)
        return False
    logfmt.event("reload", result="ok", cert=cfg.api_cert)
    return True


@dataclass
class Listeners:
    """The sockets of the API, the health port and the PROXY v2 port, bound and listening
    before the instance joins the cluster (a port in use is a configuration error)."""

    api: socket.socket
    health: socket.socket
    proxy: socket.socket | None = None

    def close(self) -> None:
        for sock in (self.api, self.health, self.proxy):
            if sock is not None:
                sock.close()


def _listen(cfg: DispatcherConfig, key: str, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, as uvicorn's own: asyncio sets TCP_NODELAY on accepted
    # connections only for such sockets (else Nagle adds ~40 ms per kept-alive response)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        raise cfg.error(key, f"{key} {port}: cannot listen on {host}:{port}: {why}") from None
    return sock


def bind_listeners(cfg: DispatcherConfig) -> Listeners:
    """Bind every listening port now; ConfigError (file:line of the port's key) if one is
    in use or not bindable. The pairing port binds later, while the instance leads."""
    done: list[socket.socket] = []
    try:
        done.append(_listen(cfg, "api_port", cfg.api_bind, cfg.api_port))
        done.append(_listen(cfg, "health_port", cfg.health_bind, cfg.health_port))
        if cfg.api_proxy_port:
            done.append(_listen(cfg, "api_proxy_port", cfg.api_bind, cfg.api_proxy_port))
    except ConfigError:
        for sock in done:
            sock.close()
        raise
    return Listeners(done[0], done[1], done[2] if len(done) > 2 else None)


def _server_config(app: object, host: str, port: int, **kw: object) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=False,  # the auth hook gets the real peer address
        server_header=False,
        **kw,  # type: ignore[arg-type]
    )


class Instance:
    """The API server, the health server and the tick loop of one instance."""

    def __init__(
        self, d: Dispatcher, role: RoleProvider | None = None, listeners: Listeners | None = None
    ) -> None:
        from dispatcher.api.app import create_app  # FastAPI: only when serving
        from dispatcher.api.connlimits import bounded_protocol_class
        from dispatcher.api.operatorcerts import OperatorTrust
        from dispatcher.api.peercert import protocol_class

        cfg = d.cfg
        self.d = d
        self.listeners = listeners
        self.exit_code: int | None = None  # set when the instance must stop with it
        self.fatal = ""  # why (printed on stderr)
        self.ctx = build_ssl(cfg)
        proxyproto.check_config(cfg)  # PROXY v2 hook (see _start_proxy)
        self.proxy: proxyproto.ProxyListener | None = None
        self.ha: HANode | None = None
        self.pairing: PairingSupervisor | None = None
        if role is None:  # the cluster node: role, fenced writer, run locks, run records
            from dispatcher.ha.node import HANode
            from dispatcher.pairing.supervisor import PairingSupervisor

            self.ha = HANode(cfg).attach(d)
            self.pairing = PairingSupervisor(
                cfg, self.ha.is_leader, self.ha.writer, self.ha.writer.epoch
            )
            self.ha.add_listener(self.pairing.kick)
            self.ha.on_restart = self._restart_from_thread
            self.ha.on_conflict = self._conflict_from_thread
        self.role: RoleProvider = role or (
            self.ha.role if self.ha else LocalRole(cfg.instance_id, cfg.lease_ttl)
        )
        self.state = InstanceState()
        sync = self.ha.sync if self.ha is not None else None
        if sync is not None:
            self.state.presented_serial = lambda: sync.loaded_serial
            self.state.restart_pending = sync.restart_pending
            self.state.not_ready = sync.ready_problem
            self.state.sync_view = sync.sync_view
        self.restart_requested = False
        self.restart_reason = ""
        self._restart_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        ctx = self.ctx
        tls: dict[str, object] = {}
        if ctx is not None:
            tls["ssl_context_factory"] = lambda _config, _default: ctx
        api_app = create_app(d, self.ha, draining=lambda: self.state.draining,
                             operators=OperatorTrust.from_config(cfg))  # fmt: skip
        self.api = uvicorn.Server(
            _server_config(
                api_app, cfg.api_bind, cfg.api_port,
                http=bounded_protocol_class(protocol_class(), cfg.api_header_timeout,
                                            cfg.api_max_conns_per_ip),
                timeout_graceful_shutdown=int(cfg.read_timeout) + 5, **tls,
            )
        )  # fmt: skip
        self.health = uvicorn.Server(
            _server_config(
                create_health_app(cfg, self.role, self.state, api_app.state.api.registry),
                cfg.health_bind, cfg.health_port,
                timeout_graceful_shutdown=2,
            )
        )  # fmt: skip
        self.stop = asyncio.Event()

    async def _ticker(self) -> None:
        while True:
            self.state.ticked()
            self.role.tick()
            await asyncio.sleep(TICK_INTERVAL)

    def _signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_cert, self.d.cfg, self.ctx, self.ha)

    # ----- restart ordered by the leader ------------------------------------------------

    def _restart_from_thread(self, reason: str) -> None:
        """Called on the HA monitor thread: drain, then restart (once)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._begin_restart, reason)

    def _begin_restart(self, reason: str) -> None:
        if self._restart_task is None and not self.stop.is_set():
            self._restart_task = asyncio.create_task(self._drain_then_restart(reason))

    async def _drain_then_restart(self, reason: str) -> None:
        wait = float(self.d.cfg.drain_wait)
        logfmt.event("restart-drain", instance=self.d.cfg.instance_id, reason=reason,
                     drain_wait=wait)  # fmt: skip
        self.state.draining = True
        if self.ha is not None:
            await asyncio.to_thread(self.ha.set_draining)
        await asyncio.sleep(wait)
        self.restart_requested = True
        self.restart_reason = reason
        self.stop.set()

    # ----- another process holds this instance's member key ---------------------------

    def _conflict_from_thread(self, exc: Exception) -> None:
        """Called on the session thread: stop, exit 78 with the message."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._fail, EX_CONFIG, str(exc))

    def _fail(self, code: int, message: str) -> None:
        if self.exit_code is None:
            self.exit_code, self.fatal = code, message
        self.stop.set()

    # ----- PROXY v2 API listener (api_proxy_port; dispatcher/api/proxyproto.py) ---------

    async def _start_proxy(self) -> bool:
        """Start the PROXY v2 listener when configured; False when it cannot listen."""
        try:
            sock = self.listeners.proxy if self.listeners is not None else None
            self.proxy = await proxyproto.start_for(self.api, self.d.cfg, self.ctx, sock)
        except OSError as exc:
            logfmt.event("api-proxy-error", logging.ERROR, port=self.d.cfg.api_proxy_port,
                         error=exc)  # fmt: skip
            return False
        return True

    async def _stop_proxy(self) -> None:
        """Stop accepting on the PROXY port; its connections drain with the API's."""
        if self.proxy is not None:
            await self.proxy.close()
            self.proxy = None

    # -----------------------------------------------------------------------------------

    async def _join_cluster(self) -> asyncio.Task[None] | None:
        """Start the cluster node and the pairing supervisor; wait (at most 2 s) until a
        leader is known, so the first ``/status`` already names one."""
        if self.ha is None or self.pairing is None:
            return None
        ha = self.ha
        try:
            await asyncio.to_thread(ha.start)
        except MemberConflict as exc:
            logfmt.event("member-conflict", logging.ERROR, instance=self.d.cfg.instance_id,
                         kind=exc.kind, holder=exc.holder_id, detail=str(exc))  # fmt: skip
            await asyncio.to_thread(ha.close)
            self._fail(EX_CONFIG, f"{self.d.cfg.path}: refusing to start: {exc}")
            return None
        except AccessDenied as exc:  # etcd refused etcd_user's password, or its role
            logfmt.event("etcd-access-denied", logging.ERROR, instance=self.d.cfg.instance_id,
                         detail=str(exc))  # fmt: skip
            await asyncio.to_thread(ha.close)
            self._fail(EX_CONFIG, f"{self.d.cfg.path}: refusing to start: {exc}")
            return None
        task = asyncio.create_task(self.pairing.run())
        deadline = asyncio.get_running_loop().time() + min(2.0, ha.ttl)
        while ha.health.ok and ha.role.snapshot().leader_id is None:
            if asyncio.get_running_loop().time() > deadline or self.stop.is_set():
                break
            await asyncio.sleep(0.02)
        return task

    async def _leave_cluster(self, pairing_task: asyncio.Task[None] | None) -> None:
        """After the drain: stop the pairing supervisor, revoke the session lease."""
        if pairing_task is not None:
            pairing_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pairing_task
        if self.ha is not None:
            await asyncio.to_thread(self.ha.close)

    async def _drain(self, graceful: bool) -> None:
        """Resign (a peer takes over at once), say draining (``/ready`` 503, the member
        record), and on a graceful stop keep serving ``drain_wait`` seconds so the load
        balancer moves new connections elsewhere before the listeners close. (A restart
        drained before it got here.) Leader-only work stops with the resignation."""
        self.state.draining = True
        await asyncio.to_thread(self.role.resign)
        if self.pairing is not None:
            self.pairing.enabled = False
            await self.pairing.stop()
        if self.ha is not None:
            await asyncio.to_thread(self.ha.set_draining)
        wait = float(self.d.cfg.drain_wait)
        if graceful and wait > 0:
            logfmt.event("api-drain", instance=self.d.cfg.instance_id, drain_wait=wait)
            await asyncio.sleep(wait)

    async def run(self) -> int:
        cfg = self.d.cfg
        self._loop = asyncio.get_running_loop()
        self._signals(self._loop)
        pairing_task = await self._join_cluster()
        if self.exit_code is not None:  # refused to join: nothing else started
            if self.listeners is not None:
                self.listeners.close()
            return self.exit_code
        ticker = asyncio.create_task(self._ticker())
        lst = self.listeners
        health_task = asyncio.create_task(
            self.health._serve(sockets=[lst.health] if lst is not None else None)
        )
        api_task = asyncio.create_task(
            self.api._serve(sockets=[lst.api] if lst is not None else None)
        )
        stopper = asyncio.create_task(self.stop.wait())
        while not self.api.started and not api_task.done() and not self.stop.is_set():
            await asyncio.sleep(0.02)
        rc = 0
        if self.api.started and await self._start_proxy():
            self.state.serving = True
            logfmt.event(
                "api-start", port=cfg.api_port, bind=cfg.api_bind,
                tls="yes" if self.ctx else "no",
                client_certs=("required" if cfg.api_require_client_cert else "optional")
                if self.ctx and self.ctx.verify_mode != ssl.CERT_NONE else "no",
                health_port=cfg.health_port, instance=cfg.instance_id,
            )  # fmt: skip
            sdnotify.notify("READY=1", f"STATUS=serving on port {cfg.api_port}")
            done, _ = await asyncio.wait(
                {api_task, health_task, stopper}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopper not in done:
                rc = 1  # a server ended by itself
        else:
            rc = 1
        # an in-place restart (same PID, execv) says READY=1 again once it serves
        sdnotify.notify("RELOADING=1" if self.restart_requested else "STOPPING=1")
        await self._drain(graceful=rc == 0 and not self.restart_requested)
        why = "restart" if self.restart_requested else ("signal" if rc == 0 else "error")
        logfmt.event("api-stop", port=cfg.api_port, reason=why)
        await self._stop_proxy()
        self.api.should_exit = True
        await asyncio.gather(api_task, return_exceptions=True)
        self.health.should_exit = True
        await asyncio.gather(health_task, return_exceptions=True)
        for task in (ticker, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._leave_cluster(pairing_task)
        return self.exit_code if self.exit_code is not None else rc


def check_config(path: str) -> int:
    """``--check-config``: every problem on stderr (file:line each); 0 or 78."""
    from dispatcher.config import check, load

    problems = check(path)
    for problem in problems:
        print(f"{IDENT}: {problem}", file=sys.stderr)
    if problems:
        return EX_CONFIG
    for warning in instance_warnings(load(path)):
        print(f"{IDENT}: warning: {warning}", file=sys.stderr)
    print(f"{path}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=IDENT, description="ctrl-exec API instance daemon")
    parser.add_argument("--config", default=default_config_path(),
                        help=f"ctrl-exec.conf path (default ${CONFIG_ENV} or {DEFAULT_CONFIG})")  # fmt: skip
    parser.add_argument(
        "--check-config", action="store_true",
        help="validate the config (no network, no port binding) and exit: 0 fine, 78 not",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"{IDENT} {__version__}")
    args = parser.parse_args(argv)
    if args.check_config:
        return check_config(args.config)
    listeners: Listeners | None = None
    try:
        d = open_dispatcher(args.config)
        logfmt.setup(IDENT, d.cfg.log_target, fmt=d.cfg.log_format)
        for warning in [*d.cfg.warnings, *instance_warnings(d.cfg)]:
            logfmt.event("config-warn", logging.WARNING, detail=warning)
        problems = instance_problems(d.cfg)
        if problems:
            for problem in problems[1:]:
                print(f"{IDENT}: {problem}", file=sys.stderr)
            raise problems[0]
        listeners = bind_listeners(d.cfg)
        instance = Instance(d, listeners=listeners)
    except ConfigError as exc:
        if listeners is not None:
            listeners.close()
        print(f"{IDENT}: {exc}", file=sys.stderr)
        logfmt.shutdown()
        return EX_CONFIG
    try:
        rc = asyncio.run(instance.run())
    except BaseException:
        logfmt.shutdown()
        raise
    if instance.fatal:  # a KEY=value line like every other (logging still runs)
        logfmt.event("api-fatal", logging.ERROR, reason=instance.fatal)
    if rc == 0 and instance.restart_requested:
        reexec(instance.restart_reason)  # does not return
    logfmt.shutdown()
    return rc


def reexec(reason: str) -> None:
    """Replace this process by a fresh one with the same command line (same PID)."""
    argv = [sys.executable, *sys.orig_argv[1:]]
    logfmt.event("restart-exec", reason=reason, argv=" ".join(argv[1:]))
    logfmt.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    sys.exit(main())
