"""The pairing listener (7444) runs on the leader only.

:class:`PairingSupervisor` is a task of the daemon's event loop. It starts a
:class:`~dispatcher.pairing.server.PairingServer` (writing through the fenced writer) as
soon as this instance is elected and stops it as soon as it is demoted (the elector calls
:meth:`kick` from its thread), re-checking once a second so a failed start (port still
held by a process going away) is retried. Agents waiting on a demoted leader get
``pairing mode stopped`` and ask again; HAProxy sends them to the new leader, whose
``/leader`` answers 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from agent.common import logfmt
from dispatcher.config import DispatcherConfig
from dispatcher.pairing.server import PairingServer
from dispatcher.statewrite import StateWriter

RECHECK = 1.0


class PairingSupervisor:
    def __init__(
        self,
        cfg: DispatcherConfig,
        leading: Callable[[], bool],
        writer: StateWriter,
        epoch: Callable[[], int | None] = lambda: None,
        *,
        stop_grace: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.leading = leading
        self.writer = writer
        self.epoch = epoch
        self.stop_grace = stop_grace
        self.server: PairingServer | None = None
        self.enabled = True
        self._kick: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_error = 0.0

    @property
    def listening(self) -> bool:
        return self.server is not None

    @property
    def port(self) -> int | None:
        return self.server.port if self.server is not None else None

    def kick(self, _leading: bool | None = None) -> None:
        """Re-check now (thread-safe: the elector calls this from its own thread)."""
        loop, ev = self._loop, self._kick
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        try:
            while True:
                await self.reconcile()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), RECHECK)
                self._kick.clear()
        finally:
            await self.stop()

    async def reconcile(self) -> None:
        want = self.enabled and self.leading()
        if want and self.server is None:
            server = PairingServer(self.cfg, writer=self.writer,
                                   approval_timeout=float(self.cfg.pairing_timeout))  # fmt: skip
            # connection tasks copy the context of the listener's start: every pairing log
            # line then names the epoch the listener serves
            token = logfmt.push_context(epoch=self.epoch())
            try:
                await server.start()
            except Exception as exc:  # bad cert, port taken, store refused a write
                now = time.monotonic()
                if now - self._last_error > 10:
                    self._last_error = now
                    logfmt.event("pairing-mode-start", logging.ERROR, port=self.cfg.pairing_port,
                                 bind=self.cfg.pairing_bind, error=exc)  # fmt: skip
                return
            finally:
                logfmt.pop_context(token)
            if not (self.enabled and self.leading()):  # lost the lead while starting
                await server.stop(self.stop_grace)
                return
            self.server = server
        elif not want and self.server is not None:
            await self.stop()

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop(self.stop_grace)
