"""``ctrl-exec-api [--config PATH]``: the instance daemon (API port plus health port).

Two ``uvicorn.Server`` objects share one event loop: the API on ``api_bind:api_port``
(TLS when ``api_cert`` and ``api_key`` are set, with operator client certificates checked
against ``api_client_ca`` when that is set; plain HTTP otherwise, as upstream) and the
plain-HTTP health port on ``health_bind:health_port``.

Signals are ours, not uvicorn's: SIGTERM/SIGINT drain (health turns 503 at once, the
role is resigned, in-flight requests finish up to ``read_timeout`` + 5 s) and exit 0;
SIGHUP reloads the API certificate into the live ``SSLContext`` (the next handshake
presents it; no listener is dropped) and keeps the old one if the new pair is bad.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from pathlib import Path

import uvicorn

from agent import logfmt
from agent.errors import ConfigError
from agent.version import __version__
from dispatcher.api.health import (
    TICK_INTERVAL,
    InstanceState,
    LocalRole,
    RoleProvider,
    create_health_app,
)
from dispatcher.config import DEFAULT_CONFIG, DispatcherConfig
from dispatcher.context import Dispatcher, open_dispatcher

IDENT = "ctrl-exec-api"


def api_tls_enabled(cfg: DispatcherConfig) -> bool:
    return bool(cfg.api_cert and cfg.api_key)


def build_ssl(cfg: DispatcherConfig) -> ssl.SSLContext | None:
    """The API server context (None for plain HTTP); raises ConfigError if unusable.

    With ``api_client_ca`` a client certificate is verified when presented
    (``CERT_OPTIONAL``): its CN becomes the operator identity given to the auth hook.
    """
    if not api_tls_enabled(cfg):
        return None
    from agent.tlsconf import server_context

    for key in ("api_cert", "api_key", "api_client_ca"):
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{key} {path} does not exist", cfg.path)
    try:
        return server_context(
            cfg.api_cert, cfg.api_key, ca=cfg.api_client_ca or None, require_client_cert=False
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the API certificate: {exc}", cfg.path) from None


def reload_cert(cfg: DispatcherConfig, ctx: ssl.SSLContext | None) -> bool:
    """SIGHUP: load ``api_cert``/``api_key`` into the live context; False keeps the old."""
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

    def __init__(self, d: Dispatcher, role: RoleProvider | None = None) -> None:
        from dispatcher.api.app import create_app  # FastAPI: only when serving
        from dispatcher.api.peercert import protocol_class

        cfg = d.cfg
        self.d = d
        self.ctx = build_ssl(cfg)
        self.role: RoleProvider = role or LocalRole(cfg.instance_id, cfg.lease_ttl)
        self.state = InstanceState()
        ctx = self.ctx
        tls: dict[str, object] = {}
        if ctx is not None:
            tls["ssl_context_factory"] = lambda _config, _default: ctx
        self.api = uvicorn.Server(
            _server_config(
                create_app(d), cfg.api_bind, cfg.api_port, http=protocol_class(),
                timeout_graceful_shutdown=int(cfg.read_timeout) + 5, **tls,
            )
        )  # fmt: skip
        self.health = uvicorn.Server(
            _server_config(
                create_health_app(cfg, self.role, self.state), cfg.health_bind, cfg.health_port,
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
        loop.add_signal_handler(signal.SIGHUP, reload_cert, self.d.cfg, self.ctx)

    async def run(self) -> int:
        cfg = self.d.cfg
        self._signals(asyncio.get_running_loop())
        ticker = asyncio.create_task(self._ticker())
        health_task = asyncio.create_task(self.health._serve())
        api_task = asyncio.create_task(self.api._serve())
        stopper = asyncio.create_task(self.stop.wait())
        while not self.api.started and not api_task.done() and not self.stop.is_set():
            await asyncio.sleep(0.02)
        rc = 0
        if self.api.started:
            self.state.serving = True
            logfmt.event(
                "api-start", port=cfg.api_port, bind=cfg.api_bind,
                tls="yes" if self.ctx else "no",
                client_certs="yes" if self.ctx and cfg.api_client_ca else "no",
                health_port=cfg.health_port, instance=cfg.instance_id,
            )  # fmt: skip
            done, _ = await asyncio.wait(
                {api_task, health_task, stopper}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopper not in done:
                rc = 1  # a server ended by itself
        else:
            rc = 1
        self.state.draining = True
        self.role.resign()
        logfmt.event("api-stop", port=cfg.api_port, reason="signal" if rc == 0 else "error")
        self.api.should_exit = True
        await asyncio.gather(api_task, return_exceptions=True)
        self.health.should_exit = True
        await asyncio.gather(health_task, return_exceptions=True)
        for task in (ticker, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=IDENT, description="ctrl-exec API instance daemon")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="ctrl-exec.conf path")
    parser.add_argument("--version", action="version", version=f"{IDENT} {__version__}")
    args = parser.parse_args(argv)
    try:
        d = open_dispatcher(args.config)
        logfmt.setup(IDENT, d.cfg.log_target)
        for warning in d.cfg.warnings:
            logfmt.event("config-warn", logging.WARNING, detail=warning)
        instance = Instance(d)
    except ConfigError as exc:
        print(f"{IDENT}: {exc}", file=sys.stderr)
        logfmt.shutdown()
        return 2
    try:
        return asyncio.run(instance.run())
    finally:
        logfmt.shutdown()


if __name__ == "__main__":
    sys.exit(main())
